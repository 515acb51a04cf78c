"""Requests to the live gateway: bodies, a poster, and one call per metered endpoint."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

from openrouter_proxy.conf import DEFAULT_ALLOWED_MODELS
from tests.support.accounts import Account, Gateway

CHAT = {"model": "x-ai/grok-code-fast-1", "messages": [{"role": "user", "content": "Hi"}]}
STREAM_CHAT = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


def post(
    gateway: Gateway,
    account: Account | None,
    body: Any = CHAT,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    all_headers = dict(account.headers if account else {})
    all_headers.update(headers or {})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    kwargs.setdefault("timeout", 10)
    return httpx.post(f"{gateway.proxy}{path}", content=content, headers=all_headers, **kwargs)


def decimal_json(response: httpx.Response) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code
    assert error["message"]
    return error


#: The seed's coding models plus the fake's models of the other endpoints.
ALLOWED = (
    *DEFAULT_ALLOWED_MODELS,
    "openai/text-embedding-3-small",
    "cohere/rerank-v3.5",
    "bytedance-seed/seedream-4.5",
    "openai/whisper-large-v3",
    "openai/gpt-4o-mini-tts",
)
CODER = "x-ai/grok-code-fast-1"
AUDIO = base64.b64encode(b"\x00\x01" * 32_000).decode()  # two seconds of 16 kHz audio


@dataclass(frozen=True)
class Call:
    path: str
    body: dict[str, Any]
    endpoint: str
    #: The cost is only in the generation stats: the record settles later.
    settles_later: bool = False

    @property
    def streamed(self) -> bool:
        return self.body.get("stream") is True


CALLS = {
    "chat": Call(
        "v1/chat/completions",
        {"model": CODER, "messages": [{"role": "user", "content": "Hi"}]},
        "chat/completions",
    ),
    "completions": Call("v1/completions", {"model": CODER, "prompt": "Hi"}, "completions"),
    "responses": Call("v1/responses", {"model": CODER, "input": "Hi"}, "responses"),
    "responses stream": Call(
        "v1/responses", {"model": CODER, "input": "Hi", "stream": True}, "responses"
    ),
    "messages": Call(
        "v1/messages",
        {"model": CODER, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]},
        "messages",
    ),
    "messages stream": Call(
        "v1/messages",
        {
            "model": CODER,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
        },
        "messages",
        settles_later=True,
    ),
    "embeddings": Call(
        "v1/embeddings",
        {"model": "openai/text-embedding-3-small", "input": ["a", "b"]},
        "embeddings",
    ),
    "rerank": Call(
        "v1/rerank",
        {"model": "cohere/rerank-v3.5", "query": "q", "documents": ["a", "b", "c"]},
        "rerank",
    ),
    "images": Call(
        "v1/images", {"model": "bytedance-seed/seedream-4.5", "prompt": "a panda"}, "images"
    ),
    "images stream": Call(
        "v1/images",
        {"model": "bytedance-seed/seedream-4.5", "prompt": "a panda", "stream": True},
        "images",
    ),
    "transcription": Call(
        "v1/audio/transcriptions",
        {"model": "openai/whisper-large-v3", "input_audio": {"data": AUDIO, "format": "wav"}},
        "audio/transcriptions",
    ),
    "speech": Call(
        "v1/audio/speech",
        {"model": "openai/gpt-4o-mini-tts", "input": "Hello there", "voice": "alloy"},
        "audio/speech",
        settles_later=True,
    ),
}
