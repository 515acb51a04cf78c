"""One long-lived ``httpx.AsyncClient`` per event loop.

A client owns a connection pool bound to the loop that created it, so each
loop (each uvicorn worker has one; tests may run several) gets its own,
created on first use and closed by :func:`close_clients` at shutdown. The
client keeps no cookies (a shared client must never carry one caller's cookie
to the next), ignores proxy environment variables, follows no redirects, and
has explicit timeouts: the read timeout applies to the wait for headers and
to each gap between two chunks.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.loops import PerLoop


class _NoCookies(CookieJar):
    def __init__(self) -> None:
        super().__init__(policy=DefaultCookiePolicy(allowed_domains=[]))


_TRANSPORT_MODULES = {"native": "openrouter_proxy.wire", "aiohttp": "openrouter_proxy.transport"}


def warm() -> None:
    """Import the configured transport's modules (aiohttp's are many) before any request."""
    module = _TRANSPORT_MODULES.get(proxy_settings.TRANSPORT)
    if module is not None:
        importlib.import_module(module)


def _new_client() -> tuple[httpx.AsyncClient, httpx.AsyncBaseTransport]:
    timeout = httpx.Timeout(
        connect=proxy_settings.CONNECT_TIMEOUT,
        read=proxy_settings.READ_TIMEOUT,
        write=proxy_settings.WRITE_TIMEOUT,
        pool=proxy_settings.POOL_TIMEOUT,
    )
    limits = httpx.Limits(
        max_connections=proxy_settings.MAX_CONNECTIONS,
        max_keepalive_connections=min(100, proxy_settings.MAX_CONNECTIONS),
        keepalive_expiry=30,
    )
    transport: httpx.AsyncBaseTransport
    if proxy_settings.TRANSPORT == "native":
        from openrouter_proxy.wire import NativeTransport

        transport = NativeTransport(limits)
    elif proxy_settings.TRANSPORT == "aiohttp":
        from openrouter_proxy.transport import AiohttpTransport

        transport = AiohttpTransport(limits)
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    client = httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        cookies=_NoCookies(),
        trust_env=False,
        follow_redirects=False,
        transport=transport,
    )
    return client, transport


#: Each loop's client and its transport; a closed client is made again.
_clients = PerLoop(_new_client, usable=lambda found: not found[0].is_closed)
_upstream = _clients.get


def get_client() -> httpx.AsyncClient:
    return _upstream()[0]


def without_body(request: httpx.Request) -> httpx.Request:
    """The request as its response keeps it: sent, so without its body.

    A response lives as long as its stream, and a coding agent's prompt can be
    hundreds of KB: the stream must not keep it.
    """
    return httpx.Request(request.method, request.url, extensions=request.extensions)


class _SentOnce(httpx.AsyncByteStream):
    """A request body that forgets its bytes once sent."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        body, self._body = self._body, b""
        if body:
            yield body


async def send(request: httpx.Request) -> httpx.Response:
    """Send a request the loop's client built, straight through its transport.

    The proxy's own forwarding needs none of what ``AsyncClient.send`` adds
    around the transport: no authentication flow, no redirects (never
    followed), no cookies (never kept), no event hooks. Timeouts still apply:
    ``build_request`` put them on the request. The body is decoded as
    ``AsyncClient.send`` would have it decoded (by the response itself).
    """
    transport = _upstream()[1]
    if not isinstance(transport, httpx.AsyncHTTPTransport):
        # The proxy's own and the aiohttp transport answer with the request already set, body-less.
        return await transport.handle_async_request(request)
    # httpx's own keeps the request's stream for as long as the response
    # streams, and leaves the request to the client to set.
    if request.content:
        request.stream = _SentOnce(request.content)
    response = await transport.handle_async_request(request)
    response.request = without_body(request)
    return response


async def close_clients() -> None:
    """Close the client of the running loop (call at shutdown)."""
    found = _clients.pop()
    if found is not None:
        await found[0].aclose()
