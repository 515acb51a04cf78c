"""An httpx transport over aiohttp's HTTP client.

The proxy keeps httpx's API (requests, responses, timeouts, exceptions) but
lets aiohttp move the bytes: on loopback, aiohttp's C-accelerated HTTP/1.1
client forwards a request in well under half the time of httpx's default
transport (see the README's benchmark). Chosen with
``OPENROUTER_PROXY_TRANSPORT = "aiohttp"`` (the default) or ``"httpx"``.

What this transport guarantees, beyond moving bytes:

* the URL is sent exactly as built (``yarl.URL(..., encoded=True)``): no
  re-quoting of the path or query string;
* no cookie is ever stored (``DummyCookieJar``);
* nothing is decompressed here: the body arrives as the upstream sent it and
  httpx decodes it, exactly as with its own transport;
* aiohttp's errors become httpx's, split the way the proxy needs them:
  connecting failed (safe to retry) versus the connection broke after the
  request was sent (not safe: the upstream may be generating, and billing);
* waiting for a free connection is bounded by httpx's ``pool`` timeout and
  ends in ``httpx.PoolTimeout`` (the gateway is busy), never in a connect
  timeout (which would blame the upstream). aiohttp counts the wait for a
  pool slot inside its connect timeout, so the transport keeps its own count
  of connections in use: a request holds a slot until its response is closed.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
from yarl import URL

from openrouter_proxy.upstream import without_body
from openrouter_proxy.wire import take_slot


@contextmanager
def _httpx_errors(request: httpx.Request, *, sent: bool) -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientConnectorError as error:
        raise httpx.ConnectError(str(error), request=request) from error
    except aiohttp.ConnectionTimeoutError as error:
        raise httpx.ConnectTimeout(str(error) or "connect timed out", request=request) from error
    except (aiohttp.ServerTimeoutError, TimeoutError) as error:
        # Sent, then no answer within the read timeout (headers or a chunk).
        raise httpx.ReadTimeout(str(error) or "read timed out", request=request) from error
    except aiohttp.ClientPayloadError as error:
        raise httpx.RemoteProtocolError(str(error), request=request) from error
    except aiohttp.ServerDisconnectedError as error:
        raise httpx.RemoteProtocolError(str(error), request=request) from error
    except aiohttp.ClientError as error:
        kind = httpx.ReadError if sent else httpx.ConnectError
        raise kind(str(error), request=request) from error


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(
        self,
        response: aiohttp.ClientResponse,
        request: httpx.Request,
        release_slot: Callable[[], None],
    ) -> None:
        self._response = response
        self._request = request
        self._release_slot = release_slot

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request, sent=True):
            # iter_any: every chunk as soon as it arrives, whatever its size.
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # Closing (not releasing) drops the connection when the body was not
        # read to its end: an abandoned stream must stop the upstream request.
        try:
            if self._response.content.at_eof():
                self._response.release()
            else:
                self._response.close()
        finally:
            self._release_slot()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (connection pool) per transport, created on first use."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None
        limit = limits.max_connections
        self._slots = asyncio.Semaphore(limit) if limit else None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 30,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        # The pool wait is bounded here (see wire.take_slot); aiohttp's own connect
        # timeout then only covers resolving and connecting.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("connect"),
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        body = request.content if request.content else None
        release_slot = await take_slot(self._slots, request, timeouts.get("pool"))
        try:
            with _httpx_errors(request, sent=False):
                response = await self._get_session().request(
                    request.method,
                    URL(str(request.url), encoded=True),
                    headers=[
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in request.headers.raw
                    ],
                    data=body,
                    allow_redirects=False,
                    timeout=timeout,
                    compress=None,
                )
        except BaseException:
            release_slot()
            raise
        # A response dropped without being closed gives its slot back when it
        # is collected, as aiohttp does with its connection.
        weakref.finalize(response, release_slot)
        sent = without_body(request)
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, sent, release_slot),
            request=sent,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
