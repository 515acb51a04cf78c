"""A lean ASGI path for the proxy, beside the site's full Django stack.

Django's built-in middleware (sessions, auth, CSRF, messages...) is
sync-only: under ASGI each one costs the proxy a hop to a thread and back on
every request, and none of it is useful to an API authenticated by key. So
requests under the proxy's prefix go to a second Django handler whose
middleware chain is empty; everything else goes to the site's handler
unchanged.

That handler also skips what Django's own does around each request with
threads: a fresh thread context per request, and the ``request_started`` /
``request_finished`` signals, whose receivers are synchronous (their job,
closing stale database connections, is done by ``openrouter_proxy.db`` for
the proxy's own threads). Host-site receivers of those signals do not see
proxied requests.

Its event loop outlives every response, so a metered request's record is
written just after its response has ended rather than before the last byte,
and a meter's admission coroutine is awaited on the loop rather than in a
database thread (see ``exchange.py``).

This layer refuses, before a byte of the body is read, a request with no API
key or with a declared body over the limit, stops reading a body that grows
past the limit, and runs the lifespan protocol: at shutdown it waits for
settlement tasks, closes the upstream client and the database threads.

Use it in the site's ``asgi.py``, after ``get_asgi_application()`` (which sets
Django up); the prefix is where the URLconf includes ``openrouter_proxy.urls``::

    application = with_proxy_fast_path(get_asgi_application())
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import IO, Any, cast

from django.core.exceptions import (
    BadRequest,
    ImproperlyConfigured,
    PermissionDenied,
    RequestAborted,
    SuspiciousOperation,
)
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import Http404, HttpRequest
from django.http.response import HttpResponseBase
from django.urls import (
    NoReverseMatch,
    ResolverMatch,
    URLResolver,
    get_resolver,
    reverse,
    set_script_prefix,
)

from openrouter_proxy import db, observability
from openrouter_proxy.callers import extract_token, get_verifier
from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.cors import cors_headers
from openrouter_proxy.errors import BODY_TOO_LARGE, MISSING_API_KEY, error_body, error_response
from openrouter_proxy.exchange import on_serving_loop
from openrouter_proxy.forward import RelayedResponse
from openrouter_proxy.liveness import stop_heartbeat
from openrouter_proxy.metering import get_meter
from openrouter_proxy.settlement import drain
from openrouter_proxy.upstream import close_clients, warm

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


#: Django's non-public handler API the fast path relies on, as (owner, name, how it
#: is used); ``tests/unit/test_django_internals.py`` pins each for every supported
#: Django minor. ``load_middleware`` fills the attributes that
#: ``_get_response_async`` reads, and a response carries its handler's class for
#: ``close()`` (the ``request_finished`` signal), as Django's own handler does.
DJANGO_INTERNALS = (
    ("BaseHandler", "_get_response_async", "awaited for the view's response"),
    ("BaseHandler", "_middleware_chain", "set: what get_response_async calls"),
    ("BaseHandler", "_view_middleware", "set empty; read by _get_response_async"),
    ("BaseHandler", "_template_response_middleware", "set empty; read likewise"),
    ("BaseHandler", "_exception_middleware", "set empty; read likewise"),
    ("BaseHandler", "resolve_request", "overridden: _get_response_async calls it for the view"),
    ("HttpResponseBase", "_handler_class", "set; read by close()"),
)


class RequestBody:
    """A proxied request's body, which lets go of its bytes once read to the end.

    Django's handler spools a body into a file that lives as long as the
    request, and the view then reads a second copy. A proxied request lives as
    long as its stream, and coding agents send prompts of hundreds of KB: this
    file holds the one copy the view reads, and drops it once read, so that a
    stream holds no copy of its prompt (the proxy forwards the bytes it read).
    """

    __slots__ = ("_data", "_position")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def read(self, size: int | None = -1) -> bytes:
        data, start = self._data, self._position
        if size is None or size < 0 or start + size >= len(data):
            self._data, self._position = b"", 0
            return data[start:] if start else data
        self._position = start + size
        return data[start : start + size]

    def readline(self, size: int | None = -1) -> bytes:
        end = self._data.find(b"\n", self._position)
        length = (end + 1 if end >= 0 else len(self._data)) - self._position
        return self.read(length if size is None or size < 0 else min(size, length))

    def close(self) -> None:
        self._data, self._position = b"", 0


#: How many paths a proxy handler remembers the view of, and the longest it remembers.
RESOLVED_PATHS = 256
RESOLVED_PATH_LENGTH = 512


class ProxyHandler(ASGIHandler):
    """Django's ASGI handler with no middleware, no request signals, a body limit."""

    #: The URLconf's resolver, and the match of each path it resolved here.
    _resolver: URLResolver | None = None
    _matches: dict[str, ResolverMatch]

    def resolve_request(self, request: HttpRequest) -> ResolverMatch:
        """Django's resolution of the request's view, remembered for each path.

        A proxied request's path is one of the few its clients call (its
        resolution walks the site's whole URLconf), and no middleware here
        can give it a URLconf of its own. The matches are of the resolver
        the URLconf has now: a new one (``clear_url_caches``, a test's
        ``ROOT_URLCONF``) starts afresh.
        """
        if hasattr(request, "urlconf"):
            return super().resolve_request(request)
        resolver = get_resolver()
        if resolver is not self._resolver:
            self._resolver, self._matches = resolver, {}
        path = request.path_info
        match = self._matches.get(path)
        if match is None:
            match = resolver.resolve(path)
            if len(self._matches) < RESOLVED_PATHS and len(path) <= RESOLVED_PATH_LENGTH:
                self._matches[path] = match
        request.resolver_match = match
        return match

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        self._middleware_chain = self._answer_errors_in_json

    async def _answer_errors_in_json(self, request: HttpRequest) -> HttpResponseBase:
        """The view's response; an unexpected error becomes a JSON 500.

        Django's own error response is an HTML page, and with ``DEBUG`` on it
        lists the view's local variables, the server's OpenRouter key among
        them. The proxy's callers get JSON and nothing else.
        """
        try:
            response: HttpResponseBase = await self._get_response_async(  # type: ignore[attr-defined]
                request
            )
        except Exception as error:
            status, message, code = _error_status(error)
            if status == 500:
                logger.exception("unexpected error in the proxy on %r", request.path)
            return error_response(
                status, message, code, headers=cors_headers(request.headers.get("Origin"))
            )
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handle(scope, receive, send)

    async def receive_body(self, receive: Receive) -> RequestBody:
        """The request's body, whole, as a :class:`RequestBody` (not Django's spooled file)."""
        limit = proxy_settings.MAX_BODY_BYTES
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestAborted
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return RequestBody(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await self.receive_body(receive)
        except RequestAborted:
            return
        except BodyTooLarge:
            limit = proxy_settings.MAX_BODY_BYTES
            await _send_error(send, *_too_large(limit), _headers(scope).get("origin"))
            return
        try:
            set_script_prefix(get_script_prefix(scope))
            # A file as far as the request reads it: read, readline, close.
            request, error_response = self.create_request(scope, cast("IO[bytes]", body))
            if request is None:
                assert error_response is not None
                await self.send_response(error_response, send)
                return
            await self._respond_unless_client_leaves(request, receive, send)
        finally:
            body.close()

    async def _respond_unless_client_leaves(
        self, request: HttpRequest, receive: Receive, send: Send
    ) -> None:
        """Respond in this task; a client that leaves first cancels it (the view sees it).

        The view runs in the server's own task for the request, not in one of
        its own: a task's first step waits for a turn of the event loop, and
        on a worker relaying many streams each turn is long.
        """
        responding = asyncio.current_task()
        assert responding is not None
        answered = False
        left = False

        def client_left(watcher: asyncio.Task[None]) -> None:
            nonlocal left
            if watcher.cancelled():
                return
            watcher.exception()  # retrieved: however it ended, the exchange is over
            if not answered:
                left = True
                responding.cancel()

        watching = asyncio.create_task(_until_disconnected(receive))
        watching.add_done_callback(client_left)
        try:
            await self._respond(request, send)
        except asyncio.CancelledError:
            if not left:
                raise  # the server's own cancellation
        finally:
            answered = True
            if left:
                responding.uncancel()
            await _stop_watching(watching)

    async def _respond(self, request: HttpRequest, send: Send) -> None:
        on_serving_loop()
        response = await self.get_response_async(request)
        response._handler_class = self.__class__  # type: ignore[attr-defined]
        with suppress(asyncio.CancelledError):
            if isinstance(response, RelayedResponse):
                await _send_relayed(response, send)
            else:
                await self.send_response(response, send)


async def _stop_watching(watching: asyncio.Task[None]) -> None:
    """End the disconnect watcher of a request whose response is over."""
    if not watching.done():
        # A server whose ``receive`` says the exchange is over once the
        # response is (uvicorn does) has woken the watcher already: one
        # turn of the loop lets it end by itself, uncancelled.
        await asyncio.sleep(0)
    if not watching.done():
        watching.cancel()
        with suppress(asyncio.CancelledError):
            await watching


async def _until_disconnected(receive: Receive) -> None:
    """Return once the server says the client is gone or the exchange is over.

    Django's ``listen_for_disconnect`` raises ``RequestAborted`` instead: an
    exception, its traceback and their frames on every request, left for the
    cycle collector.
    """
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_relayed(response: RelayedResponse, send: Send) -> None:
    """Send a relayed answer: its headers, then each upstream chunk as it comes.

    The last chunk, when the transport can tell it is the last, goes out as the
    response's end (one write for it and the end of a chunked body, not two),
    once the relay has ended: a server ends the exchange with its last
    message, and the relay's end (its record) must not be taken for a client
    that left.
    """
    headers = [(name.encode("ascii"), value.encode("latin-1")) for name, value in response.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    chunks, ended = response.chunks, response.ended
    last = b""
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            if last:  # not the last after all
                await send({"type": "http.response.body", "body": last, "more_body": True})
                last = b""
            if ended is not None and ended():
                last = chunk  # the relay's next step is its end
                continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        # Ends the relay now, whatever stopped the loop (its record included).
        await chunks.aclose()
    await send({"type": "http.response.body", "body": last})


def _error_status(error: Exception) -> tuple[int, str, str]:
    """Status, message and code of an exception that escaped the view."""
    if isinstance(error, Http404):
        return 404, "Nothing is proxied at this path.", "not_found"
    if isinstance(error, PermissionDenied):
        return 403, "Forbidden.", "forbidden"
    if isinstance(error, SuspiciousOperation | BadRequest):
        return 400, "The request is malformed.", "bad_request"
    return 500, "The gateway failed on this request.", "internal_error"


def _headers(scope: Scope) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", [])
    }


async def _send_error(send: Send, status: int, message: str, code: str, origin: str | None) -> None:
    body = error_body(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in cors_headers(origin).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def early_refusal(scope: Scope) -> tuple[int, str, str] | None:
    """A request the proxy would refuse whatever its body says."""
    if scope.get("method") == "OPTIONS":
        return None
    headers = _headers(scope)
    if extract_token(headers.get) is None:
        return MISSING_API_KEY.status, MISSING_API_KEY.message, MISSING_API_KEY.code
    declared = headers.get("content-length", "")
    limit = proxy_settings.MAX_BODY_BYTES
    if declared.isdigit() and int(declared) > limit:
        return _too_large(limit)
    return None


def _too_large(limit: int) -> tuple[int, str, str]:
    return BODY_TOO_LARGE.status, BODY_TOO_LARGE.message.format(limit=limit), BODY_TOO_LARGE.code


def mounted_prefix() -> str:
    """Where the URLconf mounts ``openrouter_proxy.urls``, e.g. ``/api/proxy/openrouter``."""
    try:
        return reverse("openrouter_proxy:proxy").rstrip("/")
    except NoReverseMatch:
        raise ImproperlyConfigured(
            'The URLconf does not include openrouter_proxy.urls: add path("api/proxy/openrouter",'
            ' include("openrouter_proxy.urls")) to it.'
        ) from None


def with_proxy_fast_path(site: ASGIApp, prefix: str | None = None) -> ASGIApp:
    """Route the proxy's prefix and everything below it to the lean proxy handler.

    The prefix is learnt from the URLconf; one given here must be the same
    (``ImproperlyConfigured`` at start-up otherwise: two prefixes that disagree
    would send the proxy's requests through the site's middleware, or the
    site's through the proxy's handler).
    """
    mounted = mounted_prefix()
    if prefix is not None and prefix.rstrip("/") != mounted:
        raise ImproperlyConfigured(
            f"with_proxy_fast_path was given the prefix {prefix!r}, but the URLconf mounts "
            f"openrouter_proxy.urls at {mounted!r}: leave the prefix out to use the URLconf's."
        )
    prefix = mounted
    proxy_app = ProxyHandler()

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == prefix or path.startswith(prefix + "/")):
            refusal = early_refusal(scope)
            if refusal is not None:
                observability.request_refused(refusal[0], refusal[2])
                await _send_error(send, *refusal, _headers(scope).get("origin"))
                return
            await proxy_app(scope, receive, send)
            return
        await site(scope, receive, send)

    return application


def prepare_worker() -> None:
    """Load what a worker's first request would load, then freeze what is loaded.

    The meter, the key verifier and the upstream transport (with their
    modules) are loaded here rather than by the first request. With
    ``OPENROUTER_PROXY_GC_FREEZE`` on, everything then alive moves to the
    collector's permanent generation (after a collection, so no garbage is
    frozen): a full collection then walks only what requests made since, not
    the whole site's modules.
    A part that fails to load is logged and left to the first request, which
    answers its error as it would without this.
    """
    parts: list[tuple[str, Callable[[], object]]] = [("meter", get_meter), ("upstream", warm)]
    if proxy_settings.KEY_VERIFIER:  # else openrouter_proxy.E002 says what is missing
        parts.append(("key verifier", get_verifier))
    for part, load in parts:
        try:
            load()
        except Exception:
            logger.exception("could not load the proxy's %s at start-up", part)
    if proxy_settings.GC_FREEZE is True:
        gc.collect()
        gc.freeze()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            prepare_worker()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await drain(proxy_settings.SHUTDOWN_GRACE)
                # After the drain: what is still unrecorded now is left to recovery.
                await stop_heartbeat()
                await close_clients()
                close_meter = getattr(get_meter(), "aclose", None)
                if close_meter is not None:
                    await close_meter()
                await asyncio.get_running_loop().run_in_executor(None, db.shutdown)
            except Exception:
                logger.exception("error while shutting the proxy down")
            await send({"type": "lifespan.shutdown.complete"})
            return
