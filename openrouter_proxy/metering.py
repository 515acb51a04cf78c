"""How the proxy meets whoever bills its traffic: the meter interface.

The proxy authenticates callers through a pluggable verifier (``callers.py``)
and meters them through a pluggable meter, named by
``OPENROUTER_PROXY_METER`` (a dotted path to a class or a factory; the check
``openrouter_proxy.E009`` says when it cannot be imported). Without one the
proxy is a plain authenticated proxy: metered endpoints are forwarded for any
valid key, nothing is admitted or recorded, and generation lookups are closed
(nobody could say whose generation it is).

The proxy owns every type that crosses the line: what it knows about a request
when it asks for admission (:class:`MeteredRequest`), what the provider
reported (:class:`ReportedUsage`), how the request ended (:class:`Outcome`,
:class:`UsageDraft`), what generation stats said later
(:class:`GenerationCost`). A meter answers in the proxy's terms too
(:class:`AdmissionResult`, :class:`Receipt`, :class:`PendingGeneration`).

Every method of a meter is synchronous and is called from the proxy's
database threads (``db.run_db``), so it may use the ORM freely. The proxy
keeps the order:

* ``admit`` before a metered request goes upstream; an admitted request is
  then either ``release``-d (the caller left before it was forwarded) or
  ``record``-ed exactly once when it ends, whatever the outcome;
* ``answered`` when the upstream's headers name the generation, so a worker
  that dies later does not take the charge with it;
* ``settle`` for a request whose record waits for its cost, from generation
  stats, and ``give_up`` when they never say it;
* ``beat`` every ``heartbeat_interval`` seconds from each serving event loop,
  and ``retire`` when the loop stops cleanly.

Six methods are optional. ``admit_many(requests)``, when the meter has it,
takes the admissions that queued on a loop behind the ones on their way to
the database threads, and returns for each, in order, its
:class:`AdmissionResult` or the exception its admission raised; if it raises,
nothing of it may have been written, and the proxy admits each alone with
``admit``. ``answered_many(notes)``, when the meter has it,
takes several :class:`AnswerNote` s in one call (a busy worker tells the
generations of its streams in batches; otherwise one ``answered`` call per
note). ``record_many(drafts)`` likewise takes the drafts of the requests that
ended while the last records were being written, and returns one
:class:`Receipt` per draft, in order; if it raises, the proxy records each
draft alone with ``record`` (so it must leave nothing half written). On a
serving loop (the fast path, see ``exchange.on_serving_loop``) the proxy
awaits ``admit_async(request)`` instead of calling ``admit`` in a thread,
when the meter has it: a meter whose database has an asynchronous driver
spares the request two thread hops. Likewise, a worker that is not busy
awaits ``record_async(draft)`` for a lone draft, when the meter has it, instead
of calling ``record`` in a thread: the thread and the loop would otherwise
trade the interpreter's lock around each of the thread's socket calls while
the loop serves the next request. It returns the :class:`Receipt` ``record``
would. At a clean stop the proxy awaits ``aclose()``, when the meter has it,
on each serving loop. ``record`` and ``record_many`` stay synchronous: they
run after the response has ended, off the request's path.
"""

from __future__ import annotations

import enum
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol, runtime_checkable

from django.utils import timezone
from django.utils.module_loading import import_string

from openrouter_proxy.callers import KeyLimits

# --- What the provider said ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportedUsage:
    """Usage and cost of one generation as reported by the provider.

    Every amount is a ``Decimal`` parsed straight from the provider's JSON
    text, and every field is ``None`` when the provider did not say it: a
    meter must be able to tell "free" (an explicit ``0``) from "unknown".
    """

    generation_id: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost: Decimal | None = None
    upstream_inference_cost: Decimal | None = None
    is_byok: bool = False
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    #: The response's shape never carries the cost (an Anthropic stream, audio
    #: bytes): the generation stats are the source to wait for, before any
    #: price-table estimate from the tokens it did report.
    cost_from_stats: bool = False

    @property
    def has_tokens(self) -> bool:
        return bool(self.prompt_tokens or self.completion_tokens)

    @property
    def provider_cost(self) -> Decimal | None:
        """What the operator paid for this generation in total, if the provider said.

        Without BYOK that is ``cost``, what OpenRouter charged (its
        ``upstream_inference_cost`` is then only a breakdown of the same money).
        With BYOK it is two bills: OpenRouter's own fee, ``cost``, taken from
        the OpenRouter credits, plus the provider's price for the inference,
        ``upstream_inference_cost``, paid on the operator's provider key. Both
        must be known: with either missing the total is unknown, not the half
        that was reported.
        """
        if not self.is_byok:
            return self.cost
        return byok_total(self.cost, self.upstream_inference_cost)


def byok_total(fee: Decimal | None, upstream_inference_cost: Decimal | None) -> Decimal | None:
    """A BYOK generation's whole price: OpenRouter's fee plus the provider's price."""
    if fee is None or upstream_inference_cost is None:
        return None
    return fee + upstream_inference_cost


@dataclass(frozen=True, slots=True)
class GenerationCost:
    """What generation stats say a generation cost the operator, and its tokens."""

    cost: Decimal
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None


# --- A metered request, from admission to its end ----------------------------------------


class Outcome(enum.StrEnum):
    """How a metered request ended."""

    COMPLETED = "completed"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    CLIENT_DISCONNECTED = "client_disconnected"
    #: Its worker died before it ended (written by a meter's recovery).
    WORKER_LOST = "worker_lost"


@dataclass(frozen=True, slots=True)
class MeteredRequest:
    """What the proxy knows about a metered request before it goes upstream."""

    request_id: uuid.UUID
    user_id: int
    endpoint: str
    streamed: bool
    requested_model: str = ""
    api_key_id: int | None = None
    api_key_label: str = ""
    limits: KeyLimits | None = None
    #: The caller's requests on this worker that have ended, with a reported
    #: cost, but whose records are still being written: they hold no upstream
    #: call any more, so a bound on requests in flight should not count them.
    #: Their costs are not in the books yet: a meter that lets them out of
    #: its bound counts ``ending_cost`` (``ending_key_cost`` of them through
    #: this key) as spent already, so that they overspend nothing.
    ending: int = 0
    ending_cost: Decimal = Decimal(0)
    ending_key_cost: Decimal = Decimal(0)


class Admission(enum.Enum):
    ADMITTED = "admitted"
    NO_CREDIT = "no_credit"
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"
    # The key's own limits (the user's other keys go on).
    KEY_SPEND_LIMIT = "key_spend_limit"
    KEY_DAILY_SPEND_LIMIT = "key_daily_spend_limit"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class AdmissionResult:
    admission: Admission
    #: Seconds after which a retry can succeed, when the meter can tell.
    retry_after: int | None = None

    @property
    def admitted(self) -> bool:
        return self.admission is Admission.ADMITTED


ADMITTED = AdmissionResult(Admission.ADMITTED)


@dataclass(frozen=True, slots=True)
class AnswerNote:
    """The generation the upstream named when it answered a request, and when."""

    request_id: uuid.UUID
    generation_id: str
    answered_at: datetime


@dataclass(frozen=True, slots=True)
class UsageDraft:
    """Everything known about one metered request when it ends."""

    request_id: uuid.UUID
    user_id: int
    endpoint: str
    streamed: bool
    outcome: str
    usage: ReportedUsage = field(default_factory=ReportedUsage)
    api_key_id: int | None = None
    api_key_label: str = ""
    requested_model: str = ""
    http_status: int | None = None
    created_at: datetime = field(default_factory=timezone.now)
    upstream_latency_ms: int | None = None
    ttfb_ms: int | None = None
    error_message: str = ""
    # The request holds an in-flight slot that recording gives back.
    holds_slot: bool = True
    # The request reached the upstream but no answer says what it cost (a
    # timeout or a broken connection after sending): never assume it was free.
    cost_unknown: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a meter did with a finished request's draft."""

    #: How the record stands: ``settled``, ``pending``, ``unpriced``, or why
    #: nothing new was written (``already_recorded``, ``duplicate_generation``,
    #: ``spooled`` when the record waits for the database to come back).
    settlement: str
    #: The cost is still unknown and generation stats may tell it: the proxy
    #: asks them and calls :meth:`Meter.settle`.
    awaits_cost: bool = False
    #: What the caller was charged now, when known (for metrics only).
    charged: Decimal | None = None


@dataclass(frozen=True, slots=True)
class PendingGeneration:
    """A recorded request whose cost waits for generation stats."""

    request_id: uuid.UUID
    generation_id: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a meter's recovery pass found (for ``reconcile_usage``)."""

    #: Records written from drafts kept aside while the database was down.
    replayed: int = 0
    #: Records written for requests whose worker died.
    recovered: int = 0


@runtime_checkable
class Meter(Protocol):
    """Admits, records and settles metered requests (see the module's docstring)."""

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between two :meth:`beat` calls of a serving loop (None: never)."""
        ...

    def admit(self, request: MeteredRequest) -> AdmissionResult:
        """Admit the request or say why not; an admitted one holds what it needs."""
        ...

    def release(self, request: MeteredRequest) -> None:
        """Give back what an admitted request held; it never went upstream."""
        ...

    def answered(self, request_id: uuid.UUID, generation_id: str) -> None:
        """The upstream answered the request and named its generation."""
        ...

    def record(self, draft: UsageDraft) -> Receipt:
        """Record the request's end, once (idempotent on ``request_id``)."""
        ...

    def settle(self, request_id: uuid.UUID, cost: GenerationCost) -> bool:
        """Settle a pending record from generation stats; False if it was not pending."""
        ...

    def give_up(self, request_id: uuid.UUID, reason: str) -> bool:
        """Stop waiting for a pending record's cost; False if it was not pending."""
        ...

    def owns_generation(self, user_id: int, generation_id: str) -> bool:
        """Whether one of the user's recorded requests is that generation."""
        ...

    def pending(self, older_than: datetime, limit: int) -> list[PendingGeneration]:
        """Records waiting for their cost, created before ``older_than``, oldest first."""
        ...

    def pending_count(self) -> int: ...

    def beat(self) -> list[PendingGeneration]:
        """This worker is alive; returns dead workers' requests now pending settlement."""
        ...

    def retire(self) -> None:
        """This worker stops cleanly."""
        ...

    def recover(self, limit: int) -> Recovery:
        """Write every record that a crash or an outage left unwritten."""
        ...


@functools.cache
def load_meter(path: str) -> Meter:
    """The meter a dotted path names (a class or a factory), made once per process."""
    factory: Callable[[], Meter] = import_string(path)
    meter = factory()
    if not isinstance(meter, Meter):
        raise TypeError(f"{path} did not make a meter: {type(meter).__name__} lacks its methods")
    return meter


def get_meter() -> Meter | None:
    """The host's meter, or None when ``OPENROUTER_PROXY_METER`` names none."""
    from openrouter_proxy.conf import proxy_settings

    path = proxy_settings.METER
    return load_meter(path) if path else None
