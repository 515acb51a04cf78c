"""Shared bits of the reliability tests: request bodies, SSE parsing, figures."""

from __future__ import annotations

import json
import os
import socket
from decimal import Decimal
from typing import Any

from tests.support.faults.rawhttp import build_request

CHAT: dict[str, Any] = {
    "model": "x-ai/grok-code-fast-1",
    "messages": [{"role": "user", "content": "Hi"}],
}
STREAM_CHAT: dict[str, Any] = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
CHAT_PATH = "/api/proxy/openrouter/v1/chat/completions"


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of the ``data:`` lines (money as Decimal); others skipped."""
    events = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                events.append(json.loads(line[6:], parse_float=Decimal))
            except ValueError:
                continue
    return events


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def open_raw_stream(
    port: int,
    token: str,
    mode: str,
    body: dict[str, Any] | None = None,
    rcvbuf: int | None = None,
) -> socket.socket:
    """Send a streamed chat request on a raw socket and return the socket unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        # Set before connecting so the advertised window stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(10)
    payload = json.dumps(body or STREAM_CHAT).encode()
    headers = [
        (b"X-Daemon-Token", token.encode()),
        (b"X-Fake-Mode", mode.encode()),
        (b"Content-Type", b"application/json"),
    ]
    sock.sendall(build_request(b"POST", CHAT_PATH.encode(), headers, payload))
    return sock


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return data


def reset_close(sock: socket.socket) -> None:
    """Close with an RST, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def report(title: str, **figures: Any) -> None:
    """Print one line of figures; append it as JSON to $RELIABILITY_FIGURES if set."""
    shown = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[figures] {title}: {shown}")
    target = os.environ.get("RELIABILITY_FIGURES")
    if target:
        with open(target, "a") as handle:
            handle.write(json.dumps({"test": title, **figures}, default=str) + "\n")
