"""What a metered request may ask for: the model allowlist, on every model it names.

OpenRouter serves a request with whichever model the body names, and a body
can name several: ``model``, a ``models`` fallback list (billed for the model
that served), Anthropic-style ``fallbacks``, a router slug
(``openrouter/auto`` picks any model), a preset (``@preset/<slug>`` as the
model, or a ``preset`` field, whose stored model wins unless overridden).
Every one of them must be allowed, or the allowlist is only advice.

Router slugs and presets choose models the request does not name, so a
pattern that merely matches everything (``*``) does not admit them: the
allowlist must name them (``openrouter/auto``, ``openrouter/*``,
``@preset/team-coder``).

Bodies are parsed as leniently as any upstream parser might (the encoding
detected as JSON allows, bad bytes replaced, integers as ``Decimal`` so no
digit limit applies), so no body the upstream would read slips past.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any

import msgspec

from openrouter_proxy.endpoints import BodyKind

#: Model ids that make OpenRouter choose the model: never admitted by ``*``.
_ROUTED_PREFIXES = ("openrouter/", "@preset/")
MAX_FALLBACKS = 32


@dataclass(frozen=True, slots=True)
class BodyFacts:
    model: str = ""
    stream: bool = False


@dataclass(frozen=True, slots=True)
class PolicyRefusal:
    """A body the gateway refuses: a 400 with this code and message."""

    code: str
    message: str


def model_allowed(model: str, patterns: tuple[str, ...]) -> bool:
    if model.startswith(_ROUTED_PREFIXES):
        prefix = next(p for p in _ROUTED_PREFIXES if model.startswith(p))
        return any(p.startswith(prefix) and fnmatchcase(model, p) for p in patterns)
    return any(fnmatchcase(model, pattern) for pattern in patterns)


def _not_allowed(model: str) -> PolicyRefusal:
    return PolicyRefusal(
        "model_not_allowed", f"The model `{model[:200]}` is not available through this gateway."
    )


def _fallback_models(payload: dict[str, Any]) -> list[object] | PolicyRefusal:
    """Every model a fallback field names (``models``, ``fallbacks``)."""
    named: list[object] = []
    for field in ("models", "fallbacks"):
        if field not in payload or payload[field] is None:
            continue
        value = payload[field]
        if not isinstance(value, list):
            return PolicyRefusal("invalid_model", f"`{field}` must be a list of model ids.")
        if len(value) > MAX_FALLBACKS:
            return PolicyRefusal("invalid_model", f"`{field}` names too many models.")
        for entry in value:
            # Anthropic-style fallbacks may be objects naming a model.
            named.append(entry.get("model") if isinstance(entry, dict) else entry)
    return named


def check_payload(payload: object, patterns: tuple[str, ...]) -> BodyFacts | PolicyRefusal:
    """Facts of an allowed body, or why it is refused."""
    if not isinstance(payload, dict) or "model" not in payload:
        return PolicyRefusal("missing_model", "The request body must name a `model`.")
    model = payload["model"]
    if not isinstance(model, str) or not model:
        return PolicyRefusal("invalid_model", "`model` must be a non-empty string.")
    fallbacks = _fallback_models(payload)
    if isinstance(fallbacks, PolicyRefusal):
        return fallbacks
    for named in (model, *fallbacks):
        if not isinstance(named, str) or not named:
            return PolicyRefusal("invalid_model", "Every fallback model must be a model id.")
        if not model_allowed(named, patterns):
            return _not_allowed(named)
    preset = payload.get("preset")
    if preset not in (None, ""):
        if not isinstance(preset, str):
            # Not echoed: the two parsers spell a number inside it differently.
            return PolicyRefusal("preset_not_allowed", "`preset` must be the name of a preset.")
        if not model_allowed(f"@preset/{preset}", patterns):
            return PolicyRefusal(
                "preset_not_allowed",
                f"The preset `{preset[:200]}` is not available through this gateway.",
            )
    return BodyFacts(model=model, stream=payload.get("stream") is True)


class _PolicyFields(msgspec.Struct):
    """The members of a body the policy reads; the rest is checked as JSON and skipped."""

    model: Any = msgspec.UNSET
    models: Any = msgspec.UNSET
    fallbacks: Any = msgspec.UNSET
    preset: Any = msgspec.UNSET
    stream: Any = msgspec.UNSET


_POLICY_FIELDS = msgspec.json.Decoder(_PolicyFields)


def _parse_json(body: bytes) -> object:
    """The members the policy reads; raises ``ValueError``/``RecursionError`` for non-JSON.

    A strict UTF-8 parser that only builds the few members the policy reads
    goes first: on a 400 KB prompt it costs a tenth of a full parse. Whatever
    it refuses (other encodings, bad bytes, a byte-order mark, lone
    surrogates, deep nesting, an array) is parsed again leniently, so a body
    it cannot read is never waved through. Where it accepts, the two agree:
    both are RFC 8259 parsers and take the last of duplicated members.
    """
    try:
        fields = _POLICY_FIELDS.decode(body)
    except (msgspec.DecodeError, RecursionError):
        text = body.decode(json.detect_encoding(body), "replace")
        return json.loads(text, parse_int=Decimal)
    return {
        name: value
        for name in fields.__struct_fields__
        if (value := getattr(fields, name)) is not msgspec.UNSET
    }


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


def form_fields(body: bytes, content_type: str, names: frozenset[str]) -> dict[str, list[str]]:
    """The values of the named text fields of a ``multipart/form-data`` body.

    Only what the policy needs (``model``, ``models``, ``stream``): parts are
    found by their boundary and their headers read; file contents are never
    decoded. Raises ``ValueError`` for a body that is not well-formed.
    """
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise ValueError("multipart body without a boundary")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    values: dict[str, list[str]] = {}
    parts = body.split(delimiter)
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise ValueError("multipart body not closed")
    for part in parts[1:-1]:
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("multipart part without headers")
        name = None
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition:"):
                match = _FIELD_NAME.search(line)
                name = match.group(1).decode("utf-8", "replace") if match else None
        if name in names:
            text = content.removesuffix(b"\r\n").decode("utf-8", "replace")
            values.setdefault(name, []).append(text)
    return values


_FORM_FIELDS = frozenset({"model", "models", "fallbacks", "preset", "stream"})


def _payload_from_form(body: bytes, content_type: str) -> dict[str, Any] | PolicyRefusal:
    try:
        fields = form_fields(body, content_type, _FORM_FIELDS)
    except ValueError:
        return PolicyRefusal("invalid_body", "The multipart body is malformed.")
    payload: dict[str, Any] = {}
    for name, values in fields.items():
        if len(values) != 1:
            return PolicyRefusal("invalid_body", f"The form names `{name}` more than once.")
        payload[name] = values[0]
    if "stream" in payload:
        payload["stream"] = payload["stream"].strip().lower() == "true"
    for name in ("models", "fallbacks"):
        if name in payload:
            payload[name] = [item.strip() for item in payload[name].split(",")]
    return payload


def inspect_body(
    body: bytes, content_type: str, patterns: tuple[str, ...], kind: BodyKind = BodyKind.JSON
) -> BodyFacts | PolicyRefusal | None:
    """Check a metered endpoint's body against the allowlist.

    Returns the body's facts, a refusal, or None for a body that is not JSON
    (forwarded untouched, as the original route did: the upstream refuses it).
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    if kind is BodyKind.JSON_OR_FORM and media_type == "multipart/form-data":
        payload: object = _payload_from_form(body, content_type)
        if isinstance(payload, PolicyRefusal):
            return payload
        return check_payload(payload, patterns)
    if not body.strip():
        return None
    try:
        payload = _parse_json(body)
    except RecursionError:
        return PolicyRefusal("invalid_json", "The JSON body is nested too deeply.")
    except ValueError:
        return None
    return check_payload(payload, patterns)
