"""The proxy's own HTTP/1.1 client for the upstream, as an httpx transport.

A proxied request needs little of a general HTTP client: one POST (or GET)
with a body already in memory, an answer read chunk by chunk, keep-alive
connections to one host. This transport does exactly that over asyncio's
protocols, with httptools (the C parser uvicorn uses) reading the answers,
so a chunk costs one parse and one wake-up of the reader, and a request
costs one write. Chosen with ``OPENROUTER_PROXY_TRANSPORT = "native"`` (the
default); ``"aiohttp"`` and ``"httpx"`` remain.

What it guarantees, as the other transports do:

* the request goes out as httpx built it: the URL's path and query byte for
  byte, its headers in order, its body with its ``Content-Length``; a header
  that would split the request (a CR or LF in it) is refused, never sent;
* nothing is decompressed here (httpx decodes, as with its own transport), and
  no cookie, redirect or proxy variable is ever looked at;
* errors are httpx's, split the way the proxy needs them: connecting failed
  (``ConnectError``, ``ConnectTimeout``: nothing was sent, a retry is safe)
  versus the request was sent and the answer never came or broke off
  (``ReadTimeout``, ``RemoteProtocolError``, ``ReadError``: the upstream may be
  generating, and billing);
* the wait for a free connection is bounded by httpx's ``pool`` timeout and
  ends in ``httpx.PoolTimeout``; the read timeout bounds the wait for the
  headers and every gap between two chunks, while the proxy is reading;
* a slow client slows the upstream down instead of filling the worker's
  memory: past a few hundred KB unread, the connection stops reading;
* a connection goes back to the pool only after a complete answer that allows
  keep-alive; an answer left unread (the client went away) closes it, so the
  upstream stops generating.

Chunks that arrived together are handed over together: nothing waits for a
later chunk, but nothing is split into more writes than it arrived in.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
import httpx

from openrouter_proxy.upstream import without_body

#: Unread bytes past which a connection stops reading until the proxy catches up.
HIGH_WATER = 256 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}

Release = Callable[[], None]


async def take_slot(
    slots: asyncio.Semaphore | None, request: httpx.Request, wait: float | None
) -> Release:
    """Wait up to ``wait`` seconds for a connection slot; returns its (idempotent) release."""
    if slots is None:
        return _nothing
    if slots.locked():
        try:
            async with asyncio.timeout(wait):
                await slots.acquire()
        except TimeoutError as error:
            raise httpx.PoolTimeout(
                "no free connection to the upstream", request=request
            ) from error
    else:
        await slots.acquire()  # free: returns at once
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            slots.release()

    return release


def _nothing() -> None:
    pass


class _Connection(asyncio.Protocol):
    """One kept-alive connection and the answer it is reading."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._head_only = False
        #: Whether the answer says where its body ends (else the connection's end does).
        self._has_length = True
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[int] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.reusable = False
        self.error: httpx.HTTPError | None = None
        self.request: httpx.Request | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._read_timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0

    # --- asyncio's side ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self.request is None:
            # Bytes on an idle connection: nothing asked for them.
            self._fail(None)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(
                httpx.RemoteProtocolError(f"malformed answer: {error}", request=self.request)
            )
            return
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("unexpected upgrade", request=self.request))
            return
        if self.buffered > HIGH_WATER and not self._paused and not self.complete:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._ended()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        self.closed = True

    def _ended(self) -> None:
        self.closed = True
        if self.request is None or self.complete or self.error is not None:
            return
        head = self.head
        if head is not None and head.done() and not self._has_length:
            # An answer delimited by the end of the connection: this is its end.
            self.complete = True
            self._stop_timer()
            self._wake()
            return
        where = "before its answer" if head is None or not head.done() else "mid-answer"
        self._fail(
            httpx.RemoteProtocolError(
                f"the upstream closed the connection {where}", request=self.request
            )
        )

    # --- httptools' side ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # an interim answer: the real one follows
            return
        names = {name.lower() for name, _ in self.headers}
        self._has_length = b"content-length" in names or b"transfer-encoding" in names
        head = self.head
        if head is not None and not head.done():
            head.set_result(status)
        if self._head_only:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        self.reusable = self.parser.should_keep_alive() and not self._head_only
        self._stop_timer()

    # --- the exchange ------------------------------------------------------------------

    def send(self, request: httpx.Request, head: bytes, body: bytes, read: float | None) -> None:
        assert self.transport is not None
        self._reset()
        self._has_length = True
        self._head_only = request.method == "HEAD"
        self.request = request
        self.head = self._loop.create_future()
        self._read_timeout = read
        self._last_read = self._loop.time()
        if read is not None:
            self._timer = self._loop.call_at(self._last_read + read, self._check_timeout)
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)

    async def next_chunk(self) -> bytes:
        """What has arrived since the last call (b"" at the end); raises if the answer broke."""
        while True:
            chunks = self.chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                if self._paused:
                    self._paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                return data
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: httpx.HTTPError | None) -> None:
        if error is not None and self.error is None and not self.complete:
            self.error = error
            head = self.head
            if head is not None and not head.done():
                head.set_exception(error)
                head.exception()  # retrieved: whoever awaits it raises it anyway
        self.reusable = False
        self._stop_timer()
        self.close()
        self._wake()

    def _check_timeout(self) -> None:
        self._timer = None
        read = self._read_timeout
        if read is None or self.complete or self.error is not None:
            return
        now = self._loop.time()
        # Only a wait the upstream causes counts: not one for the proxy to read what it has.
        if self._paused or self.chunks:
            self._last_read = now
        due = self._last_read + read
        if now < due:
            self._timer = self._loop.call_at(due, self._check_timeout)
            return
        self._fail(httpx.ReadTimeout("the upstream did not answer in time", request=self.request))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, transport: NativeTransport, connection: _Connection, release: Release):
        self._transport = transport
        self._connection: _Connection | None = connection
        self._release = release

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    def ended(self) -> bool:
        """Whether the answer has arrived whole and every byte of it been handed over."""
        connection = self._connection
        return connection is None or (
            connection.complete and not connection.chunks and connection.error is None
        )

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None:
            raise StopAsyncIteration
        chunk = await connection.next_chunk()
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if connection.complete and connection.reusable and not connection.closed:
                self._transport.keep(connection)
            else:
                connection.close()
        finally:
            self._release()


class NativeTransport(httpx.AsyncBaseTransport):
    """A pool of kept-alive HTTP/1.1 connections per origin, for one event loop."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        limit = limits.max_connections
        self._slots = asyncio.Semaphore(limit) if limit else None
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._keep = limits.max_keepalive_connections
        self._expiry = limits.keepalive_expiry
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def keep(self, connection: _Connection) -> None:
        request = connection.request
        connection.request = None
        if self._closed or request is None:
            connection.close()
            return
        idle = self._idle.setdefault(_origin(request.url), [])
        if self._keep is not None and len(idle) >= self._keep:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def _kept(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        expiry = self._expiry
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if (
                connection.closed
                or transport is None
                or transport.is_closing()
                or (expiry is not None and now - connection.idle_since > expiry)
            ):
                connection.close()
                continue
            return connection
        return None

    async def _connect(
        self, origin: tuple[str, str, int], request: httpx.Request, wait: float | None
    ) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        connection = _Connection(loop)
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            context = self._ssl
        try:
            async with asyncio.timeout(wait):
                await loop.create_connection(
                    lambda: connection,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError as error:
            connection.close()
            raise httpx.ConnectTimeout(
                "connecting to the upstream timed out", request=request
            ) from error
        except (OSError, ssl.SSLError) as error:
            connection.close()
            raise httpx.ConnectError(
                f"cannot connect to the upstream: {error}", request=request
            ) from error
        return connection

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        origin = _origin(request.url)
        if origin[0] not in DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"cannot send to {origin[0]}://", request=request)
        head = _head(request)
        body = request.content
        sent = without_body(request)
        release = await take_slot(self._slots, request, timeouts.get("pool"))
        try:
            connection = self._kept(origin) or await self._connect(
                origin, request, timeouts.get("connect")
            )
            # The connection keeps the request body-less: its stream must not keep the prompt.
            connection.send(sent, head, body, timeouts.get("read"))
            assert connection.head is not None
            try:
                status = await connection.head
            except BaseException:
                connection.close()
                raise
        except BaseException:
            release()
            raise
        stream = _Body(self, connection, release)
        # A response dropped unclosed gives its slot back when it is collected.
        weakref.finalize(stream, release)
        headers, connection.headers = connection.headers, []
        return httpx.Response(
            status_code=status,
            headers=headers,
            stream=stream,
            request=sent,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    scheme = url.scheme
    return scheme, url.host, url.port or DEFAULT_PORTS.get(scheme, 0)


def _head(request: httpx.Request) -> bytes:
    """The request line and headers, as sent; refused if a header would split the request."""
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    headers = request.headers.raw
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    # Exactly the line breaks written above: none inside a name, a value or the target.
    breaks = len(headers) + 2
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks:
        raise httpx.LocalProtocolError("a header or the target holds a line break", request=request)
    return head
