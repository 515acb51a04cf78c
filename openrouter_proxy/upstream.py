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

import asyncio
import weakref
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from openrouter_proxy.conf import proxy_settings

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


class _NoCookies(CookieJar):
    def __init__(self) -> None:
        super().__init__(policy=DefaultCookiePolicy(allowed_domains=[]))


def _new_client() -> httpx.AsyncClient:
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
    transport: httpx.AsyncBaseTransport | None = None
    if proxy_settings.TRANSPORT == "aiohttp":
        from openrouter_proxy.transport import AiohttpTransport

        transport = AiohttpTransport(limits)
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        cookies=_NoCookies(),
        trust_env=False,
        follow_redirects=False,
        transport=transport,
    )


def get_client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = _clients[loop] = _new_client()
    return client


async def close_clients() -> None:
    """Close the client of the running loop (call at shutdown)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()
