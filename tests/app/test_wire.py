"""The proxy's own HTTP/1.1 transport against a scripted upstream on loopback.

Each test's upstream is a raw asyncio server whose answers are written byte
by byte by the test, so the answers a real server rarely gives (cut short,
malformed, silent, delimited by the connection's end) are given on purpose.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
import trustme

from openrouter_proxy.wire import HIGH_WATER, NativeTransport

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"


@dataclass
class Upstream:
    url: str
    connections: int = 0


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


@asynccontextmanager
async def upstream(script: Script, tls: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    """A server on loopback that answers every connection with ``script`` (over TLS if given)."""
    seen = Upstream("")
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    seen.url = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"
    async with server:
        try:
            yield seen
        finally:
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers)


def answering(body: bytes = b'{"ok":true}', times: int = 100) -> Script:
    """A well-behaved keep-alive server: each request gets ``body``."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(times):
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(OK_HEAD + b"content-length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    return script


def client(timeout: httpx.Timeout | None = None, connections: int = 10) -> httpx.AsyncClient:
    transport = NativeTransport(httpx.Limits(max_connections=connections, keepalive_expiry=30))
    return httpx.AsyncClient(transport=transport, timeout=timeout or httpx.Timeout(5))


async def test_a_request_goes_out_as_built_and_its_answer_comes_back_whole() -> None:
    captured: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        captured.append(await read_request(reader))
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\nx-one: 1\r\nX-Two: 2\r\n\r\n")
        writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    async with upstream(script) as server, client() as http:
        body = b'{"prompt": "' + b"x" * 300_000 + b'"}'
        url = f"{server.url}/api/v1/chat/completions?a=%2f&b=%7E&c=d%20e"
        request = http.build_request(
            "POST", url, content=body, headers={"X-First": "1", "authorization": "Bearer k"}
        )
        response = await http.send(request)
    assert response.status_code == 200
    assert response.content == b"hello world"
    assert response.headers.raw[-2:] == [(b"x-one", b"1"), (b"X-Two", b"2")]
    sent = captured[0]
    head, _, sent_body = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /api/v1/chat/completions?a=%2f&b=%7E&c=d%20e HTTP/1.1"
    assert lines[1:] == [name + b": " + value for name, value in request.headers.raw]
    assert sent_body == body


async def test_a_connection_is_kept_for_the_next_request_unless_its_answer_went_unread() -> None:
    body = b"y" * (4 * HIGH_WATER)  # more than one read: an answer cut short is possible
    async with upstream(answering(body)) as server, client() as http:
        for _ in range(3):
            assert (await http.post(server.url, content=b"{}")).content == body
        assert server.connections == 1
        # An answer abandoned halfway: its connection is closed, not kept.
        async with http.stream("POST", server.url, content=b"{}") as partial:
            async for _ in partial.aiter_raw():
                break
        assert (await http.post(server.url, content=b"{}")).status_code == 200
        assert server.connections == 2


async def test_chunks_are_handed_over_as_they_arrive_and_together_when_they_arrive_together() -> (
    None
):
    first_read = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        await first_read.wait()  # the first chunk reached the client before the rest exists
        writer.write(b"1\r\nb\r\n1\r\nc\r\n0\r\n\r\n")

    async with upstream(script) as server, client() as http:
        pieces = []
        async with http.stream("POST", server.url, content=b"{}") as response:
            async for piece in response.aiter_raw():
                pieces.append(piece)
                first_read.set()
    # One write upstream (two chunks in one segment on loopback): one piece here.
    assert pieces == [b"a", b"bc"]


async def test_a_slow_reader_holds_the_upstream_back_and_loses_nothing() -> None:
    size = 128 * HIGH_WATER  # more than the kernel's buffers on loopback hold
    body = bytes(range(256)) * (size // 256)
    server_done = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"content-length: %d\r\n\r\n" % size + body)
        await writer.drain()
        server_done.set()

    async with (
        upstream(script) as server,
        client() as http,
        http.stream("POST", server.url, content=b"{}") as response,
    ):
        # Not read: the proxy stops reading, so the upstream cannot finish writing.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(server_done.wait(), 0.5)
        # httpx's client wraps the transport's stream (BoundAsyncStream).
        connection = response.stream._stream._connection  # type: ignore[union-attr]
        assert connection.buffered <= 2 * HIGH_WATER  # the rest waits upstream
        received = b"".join([piece async for piece in response.aiter_raw()])
    assert received == body
    assert server_done.is_set()


def cut_after(answer: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    return script


def silent_after(answer: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(5)

    return script


@pytest.mark.parametrize(
    ("script", "error", "before"),
    [
        (cut_after(b""), httpx.RemoteProtocolError, b""),
        (cut_after(OK_HEAD + b"content-length: 10\r\n\r\nabc"), httpx.RemoteProtocolError, b"abc"),
        (
            cut_after(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"),
            httpx.RemoteProtocolError,
            b"abc",
        ),
        (cut_after(b"SMTP ready\r\n\r\n"), httpx.RemoteProtocolError, b""),
        (silent_after(b""), httpx.ReadTimeout, b""),
        (
            silent_after(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"),
            httpx.ReadTimeout,
            b"abc",
        ),
    ],
    ids=["closed", "short", "chunked-cut", "garbage", "silent", "silent-mid-body"],
)
async def test_an_answer_that_breaks_is_the_httpx_error_for_it(
    script: Script, error: type[httpx.HTTPError], before: bytes
) -> None:
    async with upstream(script) as server, client(httpx.Timeout(5, read=0.3)) as http:
        received: list[bytes] = []

        async def read() -> None:
            async with http.stream("POST", server.url, content=b"{}") as response:
                async for piece in response.aiter_raw():
                    received.append(piece)

        with pytest.raises(error):
            await read()
        assert b"".join(received) == before
        transport = http._transport
        assert isinstance(transport, NativeTransport)
        assert not any(transport._idle.values())  # a broken connection is never kept


async def test_an_answer_delimited_by_the_end_of_its_connection_is_complete() -> None:
    script = cut_after(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nto the end")
    async with upstream(script) as server, client() as http:
        assert (await http.post(server.url, content=b"{}")).content == b"to the end"


async def test_an_interim_answer_is_skipped_and_a_head_answer_has_no_body() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HEAD + b"content-length: 2\r\n\r\nhi")
        await read_request(reader)
        writer.write(OK_HEAD + b"content-length: 5\r\n\r\n")  # HEAD: a length, no body
        await asyncio.sleep(5)

    async with upstream(script) as server, client(httpx.Timeout(5, read=1)) as http:
        interim = await http.post(server.url, content=b"{}")
        assert (interim.status_code, interim.content) == (200, b"hi")
        head = await http.head(server.url)
        assert (head.status_code, head.content) == (200, b"")


async def test_nothing_listening_is_a_connect_error_and_a_split_header_is_never_sent() -> None:
    async with upstream(answering()) as server:
        port = int(server.url.rsplit(":", 1)[1])
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")
    async with upstream(answering()) as server, client() as http:
        with pytest.raises(httpx.LocalProtocolError):
            await http.get(server.url, headers={"x-note": "a\r\nx-injected: 1"})
        assert server.connections == 0
        assert (await http.get(server.url)).status_code == 200


async def test_the_pool_keeps_at_most_its_keepalive_limit_and_drops_expired_connections() -> None:
    async with upstream(answering()) as server:
        transport = NativeTransport(
            httpx.Limits(max_connections=10, max_keepalive_connections=2, keepalive_expiry=0.2)
        )
        async with httpx.AsyncClient(transport=transport) as http:
            held = [
                await http.send(http.build_request("GET", server.url), stream=True)
                for _ in range(4)
            ]
            for response in held:
                await response.aread()
                await response.aclose()
            assert server.connections == 4
            for _ in range(2):
                assert (await http.get(server.url)).status_code == 200
            assert server.connections == 4  # two were kept
            await asyncio.sleep(0.3)
            assert (await http.get(server.url)).status_code == 200
            assert server.connections == 5  # the kept ones had expired


async def test_an_https_upstream_is_verified_by_name_and_kept_alive() -> None:
    authority = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(tls)
    body = b"z" * (4 * HIGH_WATER)
    async with upstream(answering(body), tls) as server:
        transport = NativeTransport(httpx.Limits(max_connections=10, keepalive_expiry=30))
        trusting = ssl.create_default_context()
        authority.configure_trust(trusting)
        transport._ssl = trusting  # the test's authority instead of the public ones
        async with httpx.AsyncClient(transport=transport) as http:
            for _ in range(2):
                assert (await http.post(server.url, content=b"{}")).content == body
            assert server.connections == 1
        # By default only the public authorities are trusted: this certificate is refused.
        async with client() as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.post(server.url, content=b"{}")
