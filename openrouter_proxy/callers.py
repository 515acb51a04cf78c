"""Who is calling: the contract between the proxy and a site's key system.

The proxy never looks at API keys itself. It hands the presented token to one
verifier, named by the ``OPENROUTER_PROXY_KEY_VERIFIER`` setting, and gets a
:class:`Caller` back (or ``None`` for a token that is not valid). A verifier
may be a plain function (it runs in a worker thread, so it may use the ORM) or
a coroutine function (awaited directly).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.utils.module_loading import import_string

from openrouter_proxy.db import run_db

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Limits the site puts on one key, each optional (``None``: no limit).

    ``spend_limit`` caps the key's spend in total and ``daily_spend_limit``
    its spend per UTC day (US dollars, ``Decimal``); ``requests_per_minute``
    caps how many billed requests it may start in any 60 seconds. They are
    enforced at admission, with the caller's credit.
    """

    spend_limit: Decimal | None = None
    daily_spend_limit: Decimal | None = None
    requests_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("spend_limit", "daily_spend_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Decimal) or not value >= 0):
                raise ValueError(f"{name} must be a non-negative Decimal or None, not {value!r}")
        rate = self.requests_per_minute
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 1):
            raise ValueError(f"requests_per_minute must be a positive int or None, not {rate!r}")

    def __bool__(self) -> bool:
        return (
            self.spend_limit is not None
            or self.daily_spend_limit is not None
            or self.requests_per_minute is not None
        )


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: a user of the site and the key they presented."""

    user: Any
    key_id: int | None = None
    # Public, loggable label of the key (never the secret), e.g. its prefix.
    key_label: str = ""
    # The key's own limits, if the site sets any. A verified caller is cached
    # for OPENROUTER_PROXY_KEY_CACHE_SECONDS, so a change of limits takes
    # effect within that time.
    limits: KeyLimits | None = None

    @property
    def user_id(self) -> int:
        return int(self.user.pk)


class ApiKeyRejected(Exception):
    """Raised by a verifier to refuse a token with a specific, user-facing reason."""


Verifier = Callable[[str], "Caller | Awaitable[Caller | None] | None"]


@functools.cache
def _load_verifier(path: str) -> Callable[[str], Awaitable[Caller | None]]:
    func = import_string(path)
    if inspect.iscoroutinefunction(func):
        return func  # type: ignore[no-any-return]
    return functools.partial(run_db, func)


def get_verifier() -> Callable[[str], Awaitable[Caller | None]]:
    from openrouter_proxy.conf import proxy_settings

    return _load_verifier(proxy_settings.KEY_VERIFIER)


#: How fresh a remembered answer is (see :meth:`VerificationCache.get`).
FRESH, STALE, MISSING = "fresh", "stale", "missing"


class VerificationCache:
    """What a worker recently learnt about tokens, for a few seconds.

    Keys are SHA-256 digests of the tokens (the tokens themselves are not
    kept); entries are answers (a Caller, or a refusal with its message) and
    expire after ``OPENROUTER_PROXY_KEY_CACHE_SECONDS``. Database errors are
    never cached. The size is bounded; the oldest entries go first.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, tuple[float, Caller | str | None]] = OrderedDict()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, token: str, grace: float = 0.0) -> tuple[str, Caller | str | None]:
        """(freshness, answer); a string answer is a refusal message.

        An expired caller (never a refusal) is ``STALE`` for ``grace`` seconds
        more, then forgotten.
        """
        key = self._key(token)
        entry = self._entries.get(key)
        if entry is None:
            return MISSING, None
        expires, answer = entry
        now = time.monotonic()
        if now < expires:
            return FRESH, answer
        if now < expires + grace and isinstance(answer, Caller):
            return STALE, answer
        del self._entries[key]
        return MISSING, None

    def put(self, token: str, answer: Caller | str | None, seconds: float) -> None:
        key = self._key(token)
        self._entries[key] = (time.monotonic() + seconds, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


verification_cache = VerificationCache()
#: Tokens being verified again in the background, by digest.
_reverifying: dict[bytes, asyncio.Task[None]] = {}


async def verify_token(token: str) -> Caller | None:
    """The caller a token belongs to, or None; raises :class:`ApiKeyRejected`.

    Answers are remembered briefly (see :class:`VerificationCache`). On a
    loop that outlives its responses (the fast path), a caller remembered for
    longer than that, but by less than twice as long, is answered at once while
    the token is verified again beside the request: a key in steady use never
    waits for its lookup, and one revoked is refused as soon as that lookup
    returns. A key unused for longer is verified before its request goes on.
    """
    from openrouter_proxy.conf import proxy_settings
    from openrouter_proxy.exchange import is_serving_loop

    seconds = proxy_settings.KEY_CACHE_SECONDS
    if seconds > 0:
        freshness, answer = verification_cache.get(token, seconds if is_serving_loop() else 0)
        if freshness == STALE:
            _verify_again_in_background(token, seconds)
        if freshness != MISSING:
            if isinstance(answer, str):
                raise ApiKeyRejected(answer)
            return answer
    return await _look_up(token, seconds)


async def _look_up(token: str, seconds: float) -> Caller | None:
    """Ask the verifier, and remember its answer (a caller or a refusal) for ``seconds``."""
    try:
        caller = await get_verifier()(token)
    except ApiKeyRejected as rejected:
        if seconds > 0:
            verification_cache.put(token, str(rejected), seconds)
        raise
    if seconds > 0:
        verification_cache.put(token, caller, seconds)
    return caller


def _verify_again_in_background(token: str, seconds: float) -> None:
    """Verify a remembered token again beside the request (once at a time per token)."""
    from openrouter_proxy.settlement import run_in_background

    key = VerificationCache._key(token)
    running = _reverifying.get(key)
    if running is not None and not running.done():
        return
    task = run_in_background(_verify_again(token, seconds))
    _reverifying[key] = task

    def done(finished: asyncio.Task[None]) -> None:
        if _reverifying.get(key) is finished:
            del _reverifying[key]

    task.add_done_callback(done)


async def _verify_again(token: str, seconds: float) -> None:
    try:
        await _look_up(token, seconds)
    except ApiKeyRejected:
        pass  # remembered: the token's next request is refused
    except Exception:
        # The remembered answer runs out by itself; the next request then
        # verifies the token before going on, and answers the error.
        logger.warning("could not verify a remembered key again", exc_info=True)


def extract_token(headers: Callable[[str], str | None]) -> str | None:
    """The token of a request, from the headers the clients use.

    ``X-Daemon-Token`` first, then ``Authorization: Bearer`` (the OpenAI SDKs,
    Claude Code's ``ANTHROPIC_AUTH_TOKEN``), then ``x-api-key`` (the Anthropic
    SDK). ``headers`` looks a header up by lower-case name. Returns ``None``
    when the request carries no token at all. None of them goes upstream.
    """
    daemon = (headers("x-daemon-token") or "").strip()
    if daemon:
        return daemon
    authorization = (headers("authorization") or "").strip()
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    api_key = (headers("x-api-key") or "").strip()
    return api_key or None
