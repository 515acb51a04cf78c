"""A small asyncio HTTP/1.1 load generator for loopback benchmarks.

Used when ``wrk`` is not installed, and for what wrk cannot measure: time to
the first byte of a stream, and many streams held open at once. It speaks
just enough HTTP/1.1 for this project's servers (keep-alive, Content-Length
and chunked bodies) and does as little work per request as it can, so it is
not the bottleneck it measures.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    duration: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


def build_request(url: str, body: bytes | None, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return parts.hostname or "127.0.0.1", parts.port or 80, head + (body or b"")


async def read_response(
    reader: asyncio.StreamReader, on_first_byte: list[float] | None = None
) -> int:
    """Read one response; returns its status. Records the time of the first body byte."""
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length = None
    chunked = False
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"content-length":
            length = int(value.strip())
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        first = True
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if first and on_first_byte is not None:
                on_first_byte.append(time.perf_counter())
            first = False
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
        if on_first_byte is not None:
            on_first_byte.append(time.perf_counter())
    return status


async def _worker(
    request: bytes, host: str, port: int, deadline: float, result: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            status = await read_response(reader)
            result.latencies.append(time.perf_counter() - started)
            result.requests += 1
            if status >= 400:
                result.errors += 1
    finally:
        writer.close()


async def run_load(
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    connections: int,
    duration: float,
    tokens: list[str] | None = None,
) -> LoadResult:
    """``connections`` keep-alive connections for ``duration`` seconds.

    With ``tokens`` connection *i* sends ``X-Daemon-Token: tokens[i % n]``, so
    load spreads over users as wrk's script spreads it (one user's requests in
    flight are bounded by billing).
    """
    requests = []
    for index in range(connections):
        own = dict(headers)
        if tokens:
            own["X-Daemon-Token"] = tokens[index % len(tokens)]
        requests.append(build_request(url, body, own))
    result = LoadResult()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(_worker(request, host, port, deadline, result) for host, port, request in requests)
    )
    result.duration = time.perf_counter() - started
    return result


async def time_to_first_byte(
    url: str, body: bytes, headers: dict[str, str], count: int
) -> list[float]:
    """Sequential requests on one connection; seconds from send to first body byte."""
    host, port, request = build_request(url, body, headers)
    reader, writer = await asyncio.open_connection(host, port)
    samples: list[float] = []
    try:
        for _ in range(count):
            marks: list[float] = []
            started = time.perf_counter()
            writer.write(request)
            await read_response(reader, marks)
            if marks:
                samples.append(marks[0] - started)
    finally:
        writer.close()
    return samples


async def hold_stream(url: str, body: bytes, headers: dict[str, str]) -> bool:
    """One stream read to its end on its own connection; True if it was a 200."""
    host, port, request = build_request(url, body, {**headers, "Connection": "close"})
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        status_line = await reader.readuntil(b"\r\n")
        while await reader.read(65536):
            pass
        return b" 200 " in status_line
    finally:
        writer.close()
