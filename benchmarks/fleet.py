"""A fleet of coding agents: many concurrent streamed turns for a fixed time.

Each agent holds one keep-alive connection and streams one turn after another
(a large prompt in, a slow stream of chunks out) until the window closes, as an
agent loop does. What a gateway does with hundreds of such turns at once (its
per-chunk work, its memory per open stream, its event loop under many slow
sockets) is what decides how it serves a team of agents, and a tiny-request
benchmark does not show it.

Reading goes through a bare ``asyncio.Protocol`` with its own parser of the
HTTP/1.1 framing (Content-Length, chunked, or until close), so the load
generator spends as little CPU as it can on the machine it shares with the
server it measures. A turn counts when it is a 200 whose stream ended with
``data: [DONE]``; anything else is an error, named by kind.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

from benchmarks.loadgen import build_request


@dataclass
class FleetResult:
    """Turns of one fleet run."""

    concurrency: int
    window: float
    #: Whole 200 turns that ended inside the window (the rate's numerator).
    turns: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: Seconds per whole 200 turn, from the request's first byte sent to the
    #: response's last byte received, for every turn started in the window
    #: (also those that ended while the fleet drained).
    durations: list[float] = field(default_factory=list)
    #: Seconds from the same first byte to the response's head (status and
    #: headers), for the same turns: the part of a turn before its stream.
    heads: list[float] = field(default_factory=list)
    #: Turns still running when the drain limit cut them off.
    unfinished: int = 0

    @property
    def rate(self) -> float:
        return self.turns / self.window if self.window else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + self.unfinished

    def percentile(self, fraction: float, of: list[float] | None = None) -> float:
        """A percentile of the turns' durations (or of ``of``, e.g. :attr:`heads`)."""
        values = self.durations if of is None else of
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class TurnFailed(Exception):
    """A turn that did not end as a whole response; ``args[0]`` names the kind."""


class _TurnProtocol(asyncio.Protocol):
    """One keep-alive connection reading one response at a time.

    ``expect()`` returns a future resolved with ``(status, saw_done)`` when
    the response has ended; ``keep_alive`` is False once the server said
    ``Connection: close``.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None
        self.closed = False
        self.keep_alive = True
        self._reset()

    def _reset(self) -> None:
        self.in_head = True
        self.head_at = 0.0
        self.status = 0
        self.length: int | None = None
        self.chunked = False
        self.chunk_left = -1  # -1: a chunk-size line is next; -2: the final CRLF is next
        self.saw_done = False
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if not self.in_head and self.length is None and not self.chunked:
                waiter.set_result((self.status, self.saw_done))  # a body ended by the close
            else:
                waiter.set_exception(TurnFailed("connection closed mid-response"))

    def expect(self) -> asyncio.Future[tuple[int, bool]]:
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def _body(self, data: bytes | bytearray) -> None:
        if not self.saw_done:
            self.saw_done = b"[DONE]" in self.tail + data
            self.tail = bytes(data[-8:])

    def _finish(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, self.saw_done))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        position = 0
        while self.waiter is not None:
            if self.in_head:
                end = buffer.find(b"\r\n\r\n", position)
                if end < 0:
                    break
                self._head(bytes(buffer[position:end]))
                position = end + 4
                if self.length == 0 or self.status in (204, 304):
                    self._finish()
                continue
            if self.length is not None:
                take = min(self.length, len(buffer) - position)
                self._body(buffer[position : position + take])
                self.length -= take
                position += take
                if self.length == 0:
                    self._finish()
                break
            if not self.chunked:  # the body runs until the connection closes
                self._body(buffer[position:])
                position = len(buffer)
                break
            if self.chunk_left == -1:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                size = int(bytes(buffer[position:end]).split(b";")[0], 16)
                position = end + 2
                self.chunk_left = size + 2 if size else -2
                continue
            if self.chunk_left == -2:
                if len(buffer) - position < 2:
                    break
                position += 2  # no trailers are expected
                self._finish()
                continue
            take = min(self.chunk_left, len(buffer) - position)
            self._body(buffer[position : position + take])
            self.chunk_left -= take
            position += take
            if self.chunk_left:
                break
            self.chunk_left = -1
        del buffer[:position]

    def _head(self, head: bytes) -> None:
        self.head_at = time.perf_counter()
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        self.in_head = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                self.length = int(value.strip())
            elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif lowered == b"connection" and b"close" in value.lower():
                self.keep_alive = False
        if self.chunked:
            self.length = None


async def _agent(
    host: str,
    port: int,
    request: bytes,
    start_at: float,
    deadline: float,
    turn_timeout: float,
    result: FleetResult,
) -> None:
    """One agent: a turn after another on one connection until ``deadline``."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    protocol: _TurnProtocol | None = None
    try:
        while time.perf_counter() < deadline:
            if protocol is None or protocol.closed or not protocol.keep_alive:
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.close()
                try:
                    _, protocol = await loop.create_connection(_TurnProtocol, host, port)
                except OSError as error:
                    result.errors[f"connect: {type(error).__name__}"] += 1
                    protocol = None
                    await asyncio.sleep(0.1)
                    continue
            transport = protocol.transport
            assert transport is not None
            started = time.perf_counter()
            waiter = protocol.expect()
            transport.write(request)
            try:
                status, saw_done = await asyncio.wait_for(waiter, turn_timeout)
            except TurnFailed as failure:
                result.errors[str(failure)] += 1
                protocol = None
                continue
            except TimeoutError:
                result.errors["turn timed out"] += 1
                transport.close()
                protocol = None
                continue
            ended = time.perf_counter()
            if status != 200:
                result.errors[f"status {status}"] += 1
            elif not saw_done:
                result.errors["stream without [DONE]"] += 1
            else:
                result.durations.append(ended - started)
                result.heads.append(protocol.head_at - started)
                if ended <= deadline:
                    result.turns += 1
    except asyncio.CancelledError:
        result.unfinished += 1
        raise
    except Exception as error:  # a bug here must show in the figures, not vanish
        result.errors[f"load generator: {type(error).__name__}: {error}"] += 1
    finally:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


async def run_fleet(
    url: str,
    body: bytes,
    headers_for: Callable[[int], dict[str, str]],
    concurrency: int,
    duration: float,
    *,
    ramp: float = 1.0,
    drain: float = 30.0,
    turn_timeout: float = 120.0,
    on_tick: Callable[[], None] | None = None,
    tick: float = 0.2,
) -> FleetResult:
    """``concurrency`` agents streaming turns for ``duration`` seconds.

    Agents start spread evenly over ``ramp`` seconds (a thousand connects in
    the same millisecond would measure the listen backlog, not the gateway).
    No agent starts a turn after the window; turns under way then may finish
    within ``drain`` seconds (their durations count, the rate does not), after
    which they are cut off and counted as unfinished. ``headers_for(index)``
    gives agent ``index`` its headers (its own daemon token, for instance);
    ``on_tick`` runs every ``tick`` seconds meanwhile (to sample memory).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests: dict[tuple[tuple[str, str], ...], bytes] = {}
    started = time.perf_counter()
    deadline = started + duration
    result = FleetResult(concurrency=concurrency, window=duration)
    tasks = []
    for index in range(concurrency):
        headers = headers_for(index)
        key = tuple(sorted(headers.items()))
        if key not in requests:
            requests[key] = build_request(url, body, headers)[2]
        start_at = started + ramp * index / concurrency
        agent = _agent(host, port, requests[key], start_at, deadline, turn_timeout, result)
        tasks.append(asyncio.create_task(agent))
    everything = asyncio.gather(*tasks, return_exceptions=True)
    cutoff = deadline + drain
    while not everything.done() and time.perf_counter() < cutoff:
        if on_tick is not None:
            on_tick()
        await asyncio.wait([everything], timeout=tick)
    if not everything.done():
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if on_tick is not None:
        on_tick()
    return result
