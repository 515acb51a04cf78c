"""The endpoint table, and classification on the canonical path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openrouter_proxy.endpoints import (
    BUILTIN_ENDPOINTS,
    CLOSED_BY_DEFAULT,
    Policy,
    Reader,
    endpoint_for,
    metered_names,
)
from openrouter_proxy.routing import UnsafePath, canonical_path, check_path, upstream_target
from tests.support.endpoints import CLOSED, OPEN

METERED = {
    "v1/chat/completions": ("chat/completions", Reader.CHAT),
    "v1/completions": ("completions", Reader.CHAT),
    "v1/responses": ("responses", Reader.RESPONSES),
    "v1/messages": ("messages", Reader.MESSAGES),
    "v1/embeddings": ("embeddings", Reader.USAGE),
    "v1/rerank": ("rerank", Reader.USAGE),
    "v1/images": ("images", Reader.USAGE),
    "v1/audio/transcriptions": ("audio/transcriptions", Reader.USAGE),
    "v1/audio/speech": ("audio/speech", Reader.BINARY),
}


@pytest.mark.parametrize(("path", "expected"), METERED.items())
def test_metered_endpoints(path: str, expected: tuple[str, Reader]) -> None:
    entry = endpoint_for(path)
    assert entry.policy is Policy.METERED
    assert (entry.name, entry.reader) == expected
    assert entry.allows("POST")
    assert not entry.allows("GET")


def test_no_path_is_chat_completions() -> None:
    assert endpoint_for("").name == "chat/completions"
    assert check_path(b"") == "v1/chat/completions"


@pytest.mark.parametrize("path", OPEN)
def test_open_endpoints_are_catalogue_reads(path: str) -> None:
    entry = endpoint_for(path)
    assert entry.policy is Policy.OPEN
    assert entry.allows("GET")
    assert entry.allows("HEAD")
    assert not entry.allows("POST")


@pytest.mark.parametrize("path", CLOSED)
def test_closed_endpoints(path: str) -> None:
    entry = endpoint_for(path)
    assert entry.policy is Policy.CLOSED
    assert not entry.allows("GET")
    assert not entry.allows("POST")


def test_generation_stats_are_for_the_callers_own_generations() -> None:
    assert endpoint_for("v1/generation").policy is Policy.OWN_GENERATION


def test_every_closed_family_is_closed() -> None:
    for pattern in CLOSED_BY_DEFAULT:
        path = pattern.replace("/**", "/x")
        assert endpoint_for(path).policy is Policy.CLOSED, path


def test_metered_names_are_unique_and_fit_the_record() -> None:
    names = metered_names()
    assert len(names) == len(set(names)) == len(METERED)
    assert all(0 < len(name) <= 40 for name in names)
    assert {e.pattern for e in BUILTIN_ENDPOINTS if e.policy is Policy.METERED} == set(METERED)


def test_a_host_adds_and_overrides_entries(settings: Any) -> None:
    settings.OPENROUTER_PROXY_ENDPOINTS = [
        ("v1/models/user", "open"),
        ("v1/models", "closed"),
        ("v1/tools/**", "metered", "usage"),
    ]
    assert endpoint_for("v1/models/user").policy is Policy.OPEN
    assert endpoint_for("v1/models").policy is Policy.CLOSED
    tools = endpoint_for("v1/tools/search/run")
    assert (tools.policy, tools.name, tools.reader) == (Policy.METERED, "tools/**", Reader.USAGE)
    assert endpoint_for("v1/tools").policy is Policy.CLOSED  # `**` needs a segment
    assert "tools/**" in metered_names()


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("v1/chat/complet%69ons", "v1/chat/completions"),
        ("v1/chat/%63ompletions", "v1/chat/completions"),
        ("%76%31/%6D%65%73%73%61%67%65%73", "v1/messages"),
        ("v1/models/x%2Dai/grok%7Ecode", "v1/models/x-ai/grok~code"),
        ("v1/files/a%3ab", "v1/files/a%3Ab"),
        ("v1/files/a%20b", "v1/files/a%20b"),
    ],
)
def test_canonical_path(raw: str, canonical: str) -> None:
    assert canonical_path(check_path(raw.encode())) == canonical


@given(st.sampled_from(sorted(METERED)), st.data())
def test_no_spelling_of_a_metered_path_escapes_metering(path: str, data: Any) -> None:
    """Percent-encode any subset of a metered path's characters: it is still metered."""
    spelt = "".join(
        f"%{ord(char):02{data.draw(st.sampled_from('xX'))}}"
        if char != "/" and data.draw(st.booleans())
        else char
        for char in path
    )
    canonical, url = upstream_target("https://openrouter.ai/api", spelt.encode())
    assert canonical == path
    assert endpoint_for(canonical).name == METERED[path][0]
    assert url.raw_path == f"/api/{path}".encode()


@pytest.mark.parametrize(
    "raw", [b"v1/chat/completions%2F", b"v1%2Fchat/completions", b"v1/chat/%2e%2e/key", b"%2E"]
)
def test_escaped_separators_and_dots_stay_refused(raw: bytes) -> None:
    with pytest.raises(UnsafePath):
        upstream_target("https://openrouter.ai/api", raw)
