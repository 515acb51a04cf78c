"""Serving an ASGI app in a background thread, on loopback, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def quiet_config(app: Any, host: str, port: int, **options: Any) -> uvicorn.Config:
    """A uvicorn configuration for a local server: no access log, warnings only."""
    settings: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 2,
        **options,
    }
    return uvicorn.Config(app, host=host, port=port, **settings)


@contextlib.contextmanager
def serve_in_thread(
    app: Any,
    lifespan: Literal["on", "off"] = "on",
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> Iterator[str]:
    """Serve ``app`` with uvicorn on ``host:port`` (a free port by default); yields its URL."""
    sock = bind_socket(host, port)
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(quiet_config(app, host, port, lifespan=lifespan, **options))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="asgi-in-thread", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.005)
        yield url_for(host, port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval)
