"""Usage capture beside the forwarding path.

The proxy hands the upstream response to the client byte for byte, as each
chunk arrives. Billing still needs to know what the generation was and what it
cost, and the only place that says so is the response itself: the ``usage``
object of a JSON body, or one of the last events of a ``text/event-stream``.
This module reads those facts out of the bytes *beside* forwarding: the proxy
calls ``feed()`` with every chunk it forwards and ``result()`` when the
response ends (normally, by error, or because the client went away), and gets
back a ``billing.usage.ReportedUsage``.

What it promises:

* ``feed()`` is cheap enough to sit on the hot path. Work is linear in the
  bytes fed: every byte is scanned a constant number of times, nothing already
  scanned is scanned again on the next chunk, and JSON is decoded only for the
  events that can carry billing facts (the first event, and events that
  mention a non-null ``usage``, ``error`` or ``finish_reason``).
* ``feed()`` and ``result()`` never raise, whatever the bytes. A capture that
  breaks must not break the stream a client is paying for.
* Money never goes through ``float``: numbers with a fraction or exponent are
  parsed straight from the JSON text into ``Decimal``. An explicit ``0`` stays
  ``Decimal(0)`` and an absent amount stays ``None``, so billing can tell
  "free" from "unknown".
* Memory is bounded: at most one incomplete event is held, lines that are
  never read (comments, other fields) are not kept, and an event larger than
  ``MAX_EVENT_BYTES`` is dropped and counted malformed. A JSON body is kept up
  to ``max_bytes`` only.
* ``result()`` may be called at any time and reports what was seen so far;
  an incomplete trailing event is not parsed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Protocol, runtime_checkable

import msgspec

from openrouter_proxy.endpoints import Reader
from openrouter_proxy.metering import ReportedUsage

logger = logging.getLogger(__name__)

#: An SSE event larger than this is dropped (and counted malformed) instead of
#: buffered further. OpenRouter's events are a few hundred bytes; a usage event
#: is under a kilobyte. 8 MiB leaves room for huge tool-call arguments.
MAX_EVENT_BYTES: Final = 8 * 1024 * 1024
#: A non-streaming body beyond this is not buffered for parsing.
MAX_JSON_BYTES: Final = 32 * 1024 * 1024
#: Upstream error messages are kept for humans, not for archiving.
MAX_ERROR_MESSAGE_CHARS: Final = 500

_LF: Final = 0x0A
_CR: Final = 0x0D
_DATA_PREFIX: Final = b"data:"
_DONE: Final = b"[DONE]"


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What a capture learned from one response, so far.

    ``usage`` always carries the generation id when one is known (from the
    body, else from the ``X-Generation-Id`` header given to the capture).
    """

    usage: ReportedUsage
    #: A ``usage`` object was seen (its fields may still be ``None`` when odd).
    saw_usage: bool
    #: Stream: ``data: [DONE]`` or a non-null ``finish_reason`` was seen.
    #: JSON: the body parsed as a complete JSON object.
    finished: bool
    #: Stream: an event with a top-level ``error`` was seen.
    #: JSON: the body carried a top-level ``error``.
    error: bool
    #: Stream only: events that were parsed (see the module docstring for which
    #: ones are) and were not JSON, plus events dropped for their size.
    malformed_events: int


@runtime_checkable
class UsageCapture(Protocol):
    """Something the proxy feeds the forwarded bytes to."""

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> CaptureResult: ...


# --- values out of parsed JSON ------------------------------------------------
#
# Every helper below takes whatever ``json.loads`` produced and returns either
# the value billing can trust or ``None``: upstream shapes drift, and a wrong
# type must read as "not said", never as an exception or a made-up number.


def _token_count(value: object) -> int | None:
    # ``bool`` is an ``int`` subclass; ``true`` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _amount(value: object) -> Decimal | None:
    # With ``parse_float=Decimal`` a JSON number is an ``int`` or a ``Decimal``;
    # a ``float`` can only come from the ``NaN``/``Infinity`` extensions, which
    # are not amounts. Strings are rejected too: the wire format uses numbers.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value) if value >= 0 else None
    if isinstance(value, Decimal) and value.is_finite() and value >= 0:
        return value
    return None


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _clip(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_ERROR_MESSAGE_CHARS]


def _usage_from(raw: dict[str, Any]) -> ReportedUsage:
    """Map an OpenRouter ``usage`` object (OpenAI's names) onto the usage fields.

    Endpoints other than chat name some counts as the Responses API does
    (``input_tokens``/``output_tokens``: transcriptions); those are read when
    the OpenAI names are absent.
    """
    prompt_details = _mapping(raw.get("prompt_tokens_details")) or _mapping(
        raw.get("input_tokens_details")
    )
    completion_details = _mapping(raw.get("completion_tokens_details")) or _mapping(
        raw.get("output_tokens_details")
    )
    cost_details = _mapping(raw.get("cost_details"))
    prompt = raw.get("prompt_tokens", raw.get("input_tokens"))
    completion = raw.get("completion_tokens", raw.get("output_tokens"))
    return ReportedUsage(
        prompt_tokens=_token_count(prompt),
        completion_tokens=_token_count(completion),
        cached_tokens=_token_count(prompt_details.get("cached_tokens")),
        cache_write_tokens=_token_count(prompt_details.get("cache_write_tokens")),
        reasoning_tokens=_token_count(completion_details.get("reasoning_tokens")),
        cost=_amount(raw.get("cost")),
        upstream_inference_cost=_amount(cost_details.get("upstream_inference_cost")),
        is_byok=raw.get("is_byok") is True,
    )


def _anthropic_usage_from(raw: dict[str, Any], earlier: ReportedUsage | None) -> ReportedUsage:
    """Map an Anthropic ``usage`` object onto the usage fields.

    Anthropic counts ``input_tokens`` *without* the cache reads and writes;
    the record's ``prompt_tokens`` includes them (as OpenRouter's chat usage
    does). A stream says the input counts in ``message_start`` and the final
    output count in ``message_delta``: a field a later object leaves out keeps
    its earlier value.
    """
    base = earlier or ReportedUsage()
    fresh = _token_count(raw.get("input_tokens"))
    read = _token_count(raw.get("cache_read_input_tokens"))
    written = _token_count(raw.get("cache_creation_input_tokens"))
    if fresh is None and read is None and written is None:
        prompt = base.prompt_tokens
        read, written = base.cached_tokens, base.cache_write_tokens
    else:
        prompt = (fresh or 0) + (read or 0) + (written or 0)
    completion = _token_count(raw.get("output_tokens"))
    cost_details = _mapping(raw.get("cost_details"))
    cost = _amount(raw.get("cost"))
    upstream = _amount(cost_details.get("upstream_inference_cost"))
    return ReportedUsage(
        prompt_tokens=prompt,
        completion_tokens=base.completion_tokens if completion is None else completion,
        cached_tokens=read,
        cache_write_tokens=written,
        reasoning_tokens=base.reasoning_tokens,
        cost=base.cost if cost is None else cost,
        upstream_inference_cost=base.upstream_inference_cost if upstream is None else upstream,
        is_byok=base.is_byok or raw.get("is_byok") is True,
    )


#: A strict RFC 8259 parser (UTF-8 only), money kept exact.
_STRICT_JSON = msgspec.json.Decoder(float_hook=Decimal)


def _loads(text: bytes | bytearray) -> object:
    """Parse JSON with money kept exact; raises ``ValueError``/``RecursionError``.

    msgspec's parser goes first: on an answer or a stream event it costs about
    a seventh of the standard one, and where it accepts the two agree (numbers
    with a fraction or an exponent become ``Decimal``, the last of duplicated
    members wins). What it refuses is parsed again leniently.
    """
    try:
        return _STRICT_JSON.decode(text)
    except (msgspec.DecodeError, RecursionError):
        pass
    # Invalid UTF-8 (say, a broken character inside some content), a
    # byte-order mark, a lone surrogate or NaN are accepted here rather than
    # fatal: the billing facts around them are still good.
    return json.loads(text.decode("utf-8-sig", "replace"), parse_float=Decimal)


#: Responses API stream events that end a response; each carries all of it.
_RESPONSE_ENDS: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "response.done"}
)


class _Facts:
    """The billing facts gathered from the parsed JSON objects of a response.

    ``reader`` names the response shape (see ``endpoints.Reader``): OpenAI's
    chat chunks and bodies, the Responses API's typed events, Anthropic's
    Messages events, or any body with an OpenAI-style ``usage``.
    """

    __slots__ = (
        "ended",
        "error",
        "error_code",
        "error_message",
        "finish_reason",
        "generation_id",
        "model",
        "reader",
        "streamed",
        "usage",
    )

    def __init__(self, reader: str = Reader.CHAT, *, streamed: bool = False) -> None:
        self.reader = reader
        self.streamed = streamed
        self.generation_id: str | None = None
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.usage: ReportedUsage | None = None
        self.error = False
        self.error_code: str | None = None
        self.error_message: str | None = None
        # A terminal event of a typed stream was seen.
        self.ended = False

    def absorb(self, obj: dict[str, Any], *, first_choice_only: bool) -> None:
        if self.reader == Reader.RESPONSES:
            self._absorb_responses(obj)
        elif self.reader == Reader.MESSAGES:
            self._absorb_messages(obj)
        else:
            self._absorb_openai(obj, first_choice_only=first_choice_only)

    def _absorb_ids(self, obj: dict[str, Any]) -> None:
        generation_id = obj.get("id")
        # Every chunk of a stream repeats the id; the first one is the one.
        if self.generation_id is None and isinstance(generation_id, str) and generation_id:
            self.generation_id = generation_id
        model = obj.get("model")
        # The served model can differ from the requested one; keep the latest.
        if isinstance(model, str) and model:
            self.model = model

    def _absorb_openai(self, obj: dict[str, Any], *, first_choice_only: bool) -> None:
        self._absorb_ids(obj)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices[:1] if first_choice_only else choices:
                if isinstance(choice, dict):
                    reason = choice.get("finish_reason")
                    if isinstance(reason, str) and reason:
                        self.finish_reason = reason
        usage = obj.get("usage")
        # Replace, never merge: a later usage object is the complete, final one.
        if isinstance(usage, dict):
            self.usage = _usage_from(usage)
        kind = obj.get("type")
        if isinstance(kind, str) and kind.endswith(".completed"):
            # Typed streams of other endpoints (images) end with a completed event.
            self.ended = True
        if "error" in obj:
            self._absorb_error(obj["error"])

    def _absorb_responses(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        response = obj.get("response")
        if isinstance(response, dict):
            # ``response.created`` ... ``response.completed``: each event
            # carries the response as it stands, the last one with its usage.
            self._absorb_response(response)
            if kind in _RESPONSE_ENDS:
                self.ended = True
        elif kind == "error":
            # A stream's error event: ``{"type": "error", "code", "message"}``.
            self._absorb_error(
                obj["error"] if isinstance(obj.get("error"), dict) else obj, force=True
            )
        elif kind is None or obj.get("object") == "response":
            # A whole response (a JSON body), or an error body before streaming.
            self._absorb_response(obj)

    def _absorb_response(self, response: dict[str, Any]) -> None:
        self._absorb_ids(response)
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.usage = _usage_from(usage)
        status = response.get("status")
        if isinstance(status, str) and status not in ("in_progress", "queued"):
            self.finish_reason = status
        error = response.get("error")
        if error:
            self._absorb_error(error)

    def _absorb_messages(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self._absorb_message(message)
        elif kind == "message_delta":
            delta = _mapping(obj.get("delta"))
            reason = delta.get("stop_reason")
            if isinstance(reason, str) and reason:
                self.finish_reason = reason
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.usage = _anthropic_usage_from(usage, self.usage)
        elif kind == "message_stop":
            self.ended = True
        elif kind == "error" or "error" in obj:
            self._absorb_error(obj.get("error"), force=True)
        else:
            # A whole message: the JSON body of a request that did not stream.
            self._absorb_message(obj)

    def _absorb_message(self, message: dict[str, Any]) -> None:
        self._absorb_ids(message)
        reason = message.get("stop_reason")
        if isinstance(reason, str) and reason:
            self.finish_reason = reason
        usage = message.get("usage")
        if isinstance(usage, dict):
            self.usage = _anthropic_usage_from(usage, self.usage)

    def _absorb_error(self, error: object, *, force: bool = False) -> None:
        if isinstance(error, dict):
            code = error.get("code")
            if code is None and force:
                # Anthropic's errors name their kind in ``type``.
                code = error.get("type")
            message = error.get("message")
            self.error = True
            self.error_code = None if code is None else _clip(code)
            self.error_message = None if message is None else _clip(message)
        elif error or force:
            # Not the documented shape, but clearly an error: keep what it says.
            self.error = True
            self.error_code = None
            self.error_message = _clip(error) if error else None

    def report(self, header_generation_id: str | None) -> ReportedUsage:
        base = self.usage if self.usage is not None else ReportedUsage()
        if self.reader == Reader.CHAT:
            generation_id = self.generation_id or header_generation_id
        else:
            # Response ids of other shapes (``resp_...``, ``msg_...``) need not
            # be generation ids: the header is the one to ask ``/generation``.
            generation_id = header_generation_id or self.generation_id
        return dataclasses.replace(
            base,
            generation_id=generation_id,
            # Anthropic's stream events never say the cost (its JSON body does).
            cost_from_stats=self.streamed and self.reader == Reader.MESSAGES,
            model=self.model,
            finish_reason=self.finish_reason,
            error_code=self.error_code,
            error_message=self.error_message,
        )


# --- deciding which stream events to parse -----------------------------------
#
# Most events of a stream are content deltas that say nothing billing needs.
# A substring test on the raw bytes decides whether an event is worth a
# ``json.loads``. Inside JSON strings a quote is always escaped (``\"``), so
# ``"usage"`` in raw bytes can only be a key (or a harmless false positive,
# which only costs a parse). Keys present with a ``null`` value (OpenAI-style
# ``"usage":null`` on every chunk, ``"finish_reason":null`` on content chunks)
# do not count. When unsure, parse.


@dataclass(frozen=True, slots=True)
class _Trigger:
    key: bytes
    compact_null: bytes
    null_pattern: re.Pattern[bytes]

    @classmethod
    def for_key(cls, name: str) -> _Trigger:
        key = f'"{name}"'.encode()
        return cls(key, key + b":null", re.compile(re.escape(key) + rb"\s*:\s*null"))

    def fires(self, data: bytearray) -> bool:
        occurrences = data.count(self.key)
        if not occurrences:
            return False
        # Fast path for the compact form OpenRouter writes; the regex only runs
        # when there is whitespace to allow for, or a non-null value.
        if data.count(self.compact_null) == occurrences:
            return False
        return len(self.null_pattern.findall(data)) != occurrences


_TRIGGERS: Final = tuple(_Trigger.for_key(name) for name in ("usage", "finish_reason", "error"))


def _may_matter(data: bytearray) -> bool:
    return any(trigger.fires(data) for trigger in _TRIGGERS)


class SSECapture:
    """Incremental reader of an OpenRouter ``text/event-stream`` response.

    Follows the WHATWG event-stream grammar as far as OpenRouter uses it:
    ``\\n``, ``\\r\\n`` and lone ``\\r`` end lines, a blank line dispatches an
    event, ``:`` lines are comments, ``data:`` lines accumulate, other fields
    are ignored. A leading byte-order mark is not handled: OpenRouter sends
    none. Input may be split anywhere; lines are found on bytes and only
    complete events are decoded.
    """

    __slots__ = (
        "_after_cr",
        "_data",
        "_done",
        "_dropping",
        "_facts",
        "_has_data",
        "_header_generation_id",
        "_line",
        "_line_skipped",
        "_malformed",
        "_max_event_bytes",
        "_parsed_first",
    )

    def __init__(
        self,
        generation_id: str | None = None,
        *,
        max_event_bytes: int = MAX_EVENT_BYTES,
        reader: str = Reader.CHAT,
    ) -> None:
        self._header_generation_id = generation_id or None
        self._max_event_bytes = max_event_bytes
        # The start of a line whose terminator has not arrived yet. Only lines
        # that may be ``data:`` lines are kept; see ``_extend_line``.
        self._line = bytearray()
        # The incomplete line is one we never read: its bytes are not kept.
        self._line_skipped = False
        # The previous chunk ended on ``\r``: a ``\n`` opening the next chunk
        # is the second half of that ``\r\n``, not a blank line.
        self._after_cr = False
        # Data of the event being read; ``_has_data`` tells "no data line"
        # apart from "one empty data line".
        self._data = bytearray()
        self._has_data = False
        # The event outgrew the limit: discard everything up to its blank line.
        self._dropping = False
        self._facts = _Facts(reader, streamed=True)
        # Until one event has parsed as an object, every event is parsed, so
        # the id and the model are learnt from the first one.
        self._parsed_first = False
        self._done = False
        self._malformed = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes currently held for the incomplete line and event."""
        return len(self._line) + len(self._data)

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._after_cr:
            self._after_cr = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return
        # ``bytes.splitlines`` splits on exactly ``\n``, ``\r\n`` and ``\r``
        # (unlike ``str.splitlines``, which also splits on U+2028 and friends)
        # in one C pass: precisely the event-stream line terminators.
        lines = chunk.splitlines(keepends=True)
        last_byte = chunk[-1]
        partial = b""
        if last_byte == _CR:
            self._after_cr = True
        elif last_byte != _LF:
            partial = lines.pop()
        for raw in lines:
            self._end_line(raw)
        if partial:
            self._extend_line(partial)

    def result(self) -> CaptureResult:
        facts = self._facts
        return CaptureResult(
            usage=facts.report(self._header_generation_id),
            saw_usage=facts.usage is not None,
            finished=self._done or facts.ended or facts.finish_reason is not None,
            error=facts.error,
            malformed_events=self._malformed,
        )

    # -- lines -----------------------------------------------------------------

    def _extend_line(self, piece: bytes) -> None:
        """Keep the start of a line that continues in the next chunk."""
        if self._line_skipped:
            return
        if self._dropping:
            self._line_skipped = True
            return
        self._line += piece
        # Once the first bytes cannot begin ``data:`` (a comment, ``id:``,
        # ``event:``...), nothing of the line is needed: stop keeping it, so a
        # long keep-alive or an odd field costs no memory. ``data`` alone (no
        # colon) is still a prefix, so it is kept until decided.
        if not _DATA_PREFIX.startswith(self._line[:5]):
            self._line = bytearray()
            self._line_skipped = True
        elif len(self._line) + len(self._data) > self._max_event_bytes:
            self._drop_event()
            self._line_skipped = True

    def _end_line(self, raw: bytes) -> None:
        """Handle a line whose terminator is in ``raw``."""
        if self._line_skipped:
            # The end of a line we decided not to read; it was not blank.
            self._line_skipped = False
            return
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if self._line:
            self._line += line
            line = bytes(self._line)
            self._line = bytearray()
        self._take_line(line)

    def _take_line(self, line: bytes) -> None:
        if not line:
            self._end_event()
            return
        if self._dropping:
            return
        if line.startswith(_DATA_PREFIX):
            value = line[5:]
            if value[:1] == b" ":
                value = value[1:]
        elif line == b"data":
            value = b""
        else:
            # Comments and the fields OpenRouter's events do not need.
            return
        separator = 1 if self._has_data else 0
        if len(self._data) + separator + len(value) > self._max_event_bytes:
            self._drop_event()
            return
        if separator:
            self._data += b"\n"
        self._data += value
        self._has_data = True

    # -- events ----------------------------------------------------------------

    def _drop_event(self) -> None:
        # Counted now rather than at the blank line: the event can never be
        # parsed, and a stream cut inside it should still report the loss.
        self._malformed += 1
        self._dropping = True
        self._data = bytearray()
        self._has_data = False
        self._line = bytearray()

    def _end_event(self) -> None:
        if self._dropping:
            self._dropping = False
            return
        if not self._has_data:
            return
        data = self._data
        self._data = bytearray()
        self._has_data = False
        try:
            self._handle_event(data)
        except Exception:
            # Nothing below is expected to raise (every shape is checked), but
            # a bug here must cost one event's facts, never the client's stream.
            logger.exception("usage capture failed on an event")
            self._malformed += 1

    def _handle_event(self, data: bytearray) -> None:
        if len(data) < 16 and data.strip() == _DONE:
            self._done = True
            return
        if data.isspace() or not data:
            # ``data:`` with nothing after it: no JSON to parse, no fact lost.
            return
        if self._parsed_first and not _may_matter(data):
            return
        try:
            obj = _loads(data)
        except (ValueError, RecursionError):
            self._malformed += 1
            return
        if isinstance(obj, dict):
            self._parsed_first = True
            self._facts.absorb(obj, first_choice_only=False)


class JSONCapture:
    """Capture of a non-streaming response: the body is parsed once, at the end."""

    __slots__ = (
        "_chunks",
        "_header_generation_id",
        "_max_bytes",
        "_overflowed",
        "_reader",
        "_result",
        "_size",
    )

    def __init__(
        self,
        generation_id: str | None = None,
        max_bytes: int = MAX_JSON_BYTES,
        *,
        reader: str = Reader.CHAT,
    ) -> None:
        self._header_generation_id = generation_id or None
        self._reader = reader
        self._max_bytes = max_bytes
        # Chunks are joined once, in ``result()``: joining on every feed would
        # copy the body over and over.
        self._chunks: list[bytes] = []
        self._size = 0
        self._overflowed = False
        self._result: CaptureResult | None = None

    def feed(self, chunk: bytes) -> None:
        if not chunk or self._overflowed:
            return
        self._result = None
        self._size += len(chunk)
        if self._size > self._max_bytes:
            # Past the limit the body is not parsed at all: free what we held.
            self._overflowed = True
            self._chunks = []
            return
        self._chunks.append(chunk)

    def result(self) -> CaptureResult:
        if self._result is None:
            self._result = self._parse()
        return self._result

    def _parse(self) -> CaptureResult:
        obj: object = None
        if not self._overflowed and self._chunks:
            body = b"".join(self._chunks)
            self._chunks = [body]
            try:
                # OpenRouter pads bodies with whitespace before the ``{``;
                # ``json.loads`` skips leading and trailing whitespace.
                obj = _loads(body)
            except (ValueError, RecursionError):
                obj = None
        facts = _Facts(self._reader)
        if isinstance(obj, dict):
            try:
                facts.absorb(obj, first_choice_only=True)
            except Exception:
                # As for streams: a capture bug must never reach the caller.
                logger.exception("usage capture failed on a JSON body")
                facts = _Facts(self._reader)
                obj = None
        return CaptureResult(
            usage=facts.report(self._header_generation_id),
            saw_usage=facts.usage is not None,
            finished=isinstance(obj, dict),
            error=facts.error,
            malformed_events=0,
        )


class BinaryCapture:
    """Capture of a body that carries no usage (audio bytes): nothing is kept.

    The generation id comes from the ``X-Generation-Id`` header, and the cost
    from the generation stats once the body has ended.
    """

    __slots__ = ("_header_generation_id", "_size")

    def __init__(self, generation_id: str | None = None) -> None:
        self._header_generation_id = generation_id or None
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)

    def result(self) -> CaptureResult:
        return CaptureResult(
            usage=ReportedUsage(generation_id=self._header_generation_id, cost_from_stats=True),
            saw_usage=False,
            finished=False,
            error=False,
            malformed_events=0,
        )


def capture_for(
    content_type: str | None, generation_id: str | None = None, reader: str = Reader.CHAT
) -> UsageCapture:
    """The capture for a response of this ``Content-Type`` from an endpoint of this shape."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type == "text/event-stream":
        return SSECapture(generation_id, reader=reader)
    if reader == Reader.BINARY and media_type != "application/json":
        return BinaryCapture(generation_id)
    return JSONCapture(generation_id, reader=reader)
