"""The endpoint table: every upstream path the proxy forwards, and how.

The server's OpenRouter key serves inference and nothing else. A request is
forwarded only when its canonical path (see ``routing.canonical_path``) matches
an entry of this table, and what happens to it is the entry's policy:

* ``metered``: the caller needs credit and a free in-flight slot; the body's
  model is checked against the allowlist; the response is read for its usage
  (``reader`` names the response shape) and becomes a usage record with its
  ledger row. Each has a stable ``name``, the record's ``endpoint``.
* ``open``: catalogue reads that cost nothing and reveal nothing about the
  operator's account; any valid key may make them, credit or not.
* ``own_generation``: ``v1/generation?id=``, answered only for a generation the
  caller's own usage records name; any other id is a 404 from the gateway.
* ``closed``: answered by the gateway with 404 ``endpoint_not_available``,
  never forwarded. Everything not in the table is closed.

A host adds or overrides entries with ``OPENROUTER_PROXY_ENDPOINTS``: a list of
``(pattern, policy)`` or ``(pattern, "metered", reader)`` tuples, consulted
before the built-in table (``checks.py`` validates them). Patterns are paths
of segments; ``{name}`` matches one segment, and a final ``**`` matches one or
more further segments.

Asynchronously billed jobs (``v1/videos``, ``beta/batches``) are closed: their
cost is known only when the job completes, long after the request.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_PATH = "v1/chat/completions"


class Policy(enum.StrEnum):
    METERED = "metered"
    OPEN = "open"
    OWN_GENERATION = "own_generation"
    CLOSED = "closed"


class Reader(enum.StrEnum):
    """The shape of a metered endpoint's response, for ``capture``."""

    CHAT = "chat"  # chat/completions and completions: OpenAI chunks, ``usage``
    RESPONSES = "responses"  # Responses API: typed events carrying ``response``
    MESSAGES = "messages"  # Anthropic Messages: Anthropic's usage names
    USAGE = "usage"  # one JSON body (or events) with an OpenAI-style ``usage``
    BINARY = "binary"  # no usage in the body: cost from generation stats only


class BodyKind(enum.StrEnum):
    """How the model is read out of a metered request's body."""

    JSON = "json"
    JSON_OR_FORM = "json_or_form"  # audio/transcriptions also takes multipart


@dataclass(frozen=True, slots=True)
class Endpoint:
    pattern: str
    policy: Policy
    #: The record's ``endpoint`` for metered entries (also shown to operators).
    name: str = ""
    reader: Reader = Reader.USAGE
    body: BodyKind = BodyKind.JSON
    methods: frozenset[str] = frozenset({"POST"})

    def allows(self, method: str) -> bool:
        return method in self.methods or (method == "HEAD" and "GET" in self.methods)


_GET = frozenset({"GET"})


def _metered(
    path: str, reader: Reader, body: BodyKind = BodyKind.JSON, name: str | None = None
) -> Endpoint:
    return Endpoint(path, Policy.METERED, name=metered_name(path, name), reader=reader, body=body)


def metered_name(path: str, name: str | None = None) -> str:
    """A metered entry's record name: given, or its path without ``v1/`` (40 characters at most)."""
    return name or path.removeprefix("v1/")[:40]


def _open(path: str) -> Endpoint:
    return Endpoint(path, Policy.OPEN, methods=_GET)


BUILTIN_ENDPOINTS: tuple[Endpoint, ...] = (
    _metered("v1/chat/completions", Reader.CHAT),
    _metered("v1/completions", Reader.CHAT),
    _metered("v1/responses", Reader.RESPONSES),
    _metered("v1/messages", Reader.MESSAGES),
    _metered("v1/embeddings", Reader.USAGE),
    _metered("v1/rerank", Reader.USAGE),
    _metered("v1/images", Reader.USAGE),
    _metered("v1/audio/transcriptions", Reader.USAGE, BodyKind.JSON_OR_FORM),
    _metered("v1/audio/speech", Reader.BINARY),
    Endpoint("v1/generation", Policy.OWN_GENERATION, methods=_GET),
    _open("v1/models"),
    _open("v1/models/count"),
    _open("v1/models/{author}/{slug}/endpoints"),
    _open("v1/model/{author}/{slug}"),
    _open("v1/embeddings/models"),
    _open("v1/images/models"),
    _open("v1/images/models/{author}/{slug}/endpoints"),
    _open("v1/videos/models"),
    _open("v1/providers"),
    _open("v1/endpoints/zdr"),
)

#: Served by the gateway itself as 404 ``endpoint_not_available``; listed so
#: the decision is visible (anything unknown is closed as well).
CLOSED_BY_DEFAULT: tuple[str, ...] = (
    "v1/key",
    "v1/keys/**",
    "v1/credits/**",
    "v1/auth/**",
    "v1/activity",
    "v1/analytics/**",
    "v1/generation/content",
    "v1/generation/feedback",
    "v1/files/**",
    "v1/presets/**",
    "v1/workspaces/**",
    "v1/organization/**",
    "v1/byok/**",
    "v1/guardrails/**",
    "v1/observability/**",
    "v1/scim/**",
    "v1/private-endpoints/**",
    "v1/models/user",
    "v1/videos/**",
    "beta/batches/**",
    "v1/messages/count_tokens",
)

CLOSED = Endpoint("", Policy.CLOSED, methods=frozenset())

_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")


class PatternError(ValueError):
    """An endpoint pattern that cannot be matched."""


def pattern_segments(pattern: str) -> tuple[str, ...]:
    """The segments of a pattern; raises :class:`PatternError` when malformed."""
    if not isinstance(pattern, str) or not pattern or pattern.startswith("/"):
        raise PatternError("a pattern is a relative path such as `v1/models`")
    segments = tuple(pattern.split("/"))
    for index, segment in enumerate(segments):
        if not segment:
            raise PatternError("empty segment")
        if segment == "**":
            if index != len(segments) - 1 or index == 0:
                raise PatternError("`**` may only end a pattern, after a fixed segment")
        elif "{" in segment or "}" in segment:
            if not _PARAM.match(segment):
                raise PatternError(f"bad parameter segment {segment!r}")
        elif "*" in segment or "%" in segment:
            raise PatternError(f"bad segment {segment!r}")
    return segments


def _matches(segments: Sequence[str], path: Sequence[str]) -> bool:
    if segments and segments[-1] == "**":
        head = segments[:-1]
        return len(path) > len(head) and _matches(head, path[: len(head)])
    if len(segments) != len(path):
        return False
    return all(
        want == got or want.startswith("{") for want, got in zip(segments, path, strict=True)
    )


def _entry_from_setting(raw: Any) -> Endpoint:
    """An entry of ``OPENROUTER_PROXY_ENDPOINTS``; raises ``ValueError``."""
    if isinstance(raw, Endpoint):
        pattern_segments(raw.pattern)
        return raw
    pattern: Any
    policy_name: Any
    if isinstance(raw, dict):
        unknown = set(raw) - {"path", "policy", "reader", "methods", "name"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        pattern, policy_name = raw.get("path"), raw.get("policy")
        reader, methods, name = raw.get("reader"), raw.get("methods"), raw.get("name")
    elif isinstance(raw, list | tuple) and len(raw) in (2, 3):
        pattern, policy_name, *rest = raw
        reader, methods, name = (rest[0] if rest else None), None, None
    else:
        raise ValueError("each entry is (pattern, policy), (pattern, 'metered', reader) or a dict")
    pattern_segments(pattern)
    policy = Policy(policy_name)
    path = str(pattern)
    if policy is Policy.OWN_GENERATION:
        raise ValueError("own_generation is reserved for v1/generation")
    if (reader is not None) != (policy is Policy.METERED):
        raise ValueError(f"a reader is required for metered entries, and only them ({pattern!r})")
    if methods is not None:
        if isinstance(methods, str) or not all(isinstance(m, str) and m for m in methods):
            raise ValueError(f"methods of {pattern!r} must be a list of HTTP methods")
        allowed = frozenset(m.upper() for m in methods)
    elif policy is Policy.METERED:
        allowed = frozenset({"POST"})
    else:
        allowed = frozenset() if policy is Policy.CLOSED else _GET
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 40):
        raise ValueError(f"the name of {pattern!r} must be 1 to 40 characters")
    return Endpoint(
        path,
        policy,
        name=metered_name(path, name) if policy is Policy.METERED else "",
        reader=Reader(reader) if reader is not None else Reader.USAGE,
        methods=allowed,
    )


def entries_from_setting(raw: Iterable[Any]) -> tuple[Endpoint, ...]:
    """The host's entries; raises ``ValueError`` (or ``TypeError``) when malformed."""
    return _parsed(tuple(_hashable(entry) for entry in raw))


def _hashable(entry: Any) -> Any:
    if isinstance(entry, list):
        return tuple(entry)
    if isinstance(entry, dict):
        return _FrozenEntry(entry)
    return entry


class _FrozenEntry(dict[str, Any]):
    """A dict entry that can key the parse cache (compared by its items)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(repr(sorted(self.items(), key=lambda item: item[0])))


@functools.lru_cache(maxsize=8)
def _parsed(raw: tuple[Any, ...]) -> tuple[Endpoint, ...]:
    return tuple(_entry_from_setting(entry) for entry in raw)


class _Table:
    """Ordered entries; the first match wins. Answers are remembered per path."""

    MAX_REMEMBERED = 4096

    def __init__(self, entries: Sequence[Endpoint]) -> None:
        self._entries = tuple((pattern_segments(e.pattern), e) for e in entries)
        self._answers: dict[str, Endpoint] = {}

    def lookup(self, path: str) -> Endpoint:
        found = self._answers.get(path)
        if found is not None:
            return found
        found = CLOSED
        segments = path.split("/")
        for pattern, endpoint in self._entries:
            if _matches(pattern, segments):
                found = endpoint
                break
        if len(self._answers) < self.MAX_REMEMBERED:
            self._answers[path] = found
        return found


@functools.lru_cache(maxsize=8)
def _build(extra: tuple[Endpoint, ...]) -> _Table:
    closed = tuple(Endpoint(path, Policy.CLOSED, methods=frozenset()) for path in CLOSED_BY_DEFAULT)
    # The first match wins: a host's entries, then the built-in ones, then the
    # explicitly closed families.
    return _Table((*extra, *BUILTIN_ENDPOINTS, *closed))


def configured_entries() -> tuple[Endpoint, ...]:
    from openrouter_proxy.conf import proxy_settings

    return entries_from_setting(proxy_settings.ENDPOINTS)


def endpoint_for(path: str) -> Endpoint:
    """The table's entry for a canonical path (``CLOSED`` when none matches)."""
    return _build(configured_entries()).lookup(path or DEFAULT_PATH)


def metered_names() -> tuple[str, ...]:
    """Names of the metered endpoints, for operators' filters and reports."""
    names = [e.name for e in (*configured_entries(), *BUILTIN_ENDPOINTS) if e.name]
    return tuple(dict.fromkeys(names))
