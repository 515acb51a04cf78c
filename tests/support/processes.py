"""The site under ``uvicorn --workers N`` in a separate process, for multi-process tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.db import connection

from devtools.fake_openrouter import bind_socket
from tests.support.servers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    """A URL for the database the tests are using right now."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{Path(params['NAME']).resolve()}"
    user = params.get("USER") or "postgres"
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    host = params.get("HOST") or "127.0.0.1"
    port = params.get("PORT") or "5432"
    return f"postgres://{user}{password}@{host}:{port}/{params['NAME']}"


def free_port() -> int:
    sock = bind_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def server_environment(base_url: str, **env: Any) -> dict[str, str]:
    """The environment of a server process sharing this test run's database and keys."""
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "OPENROUTER_API_KEY": settings.OPENROUTER_PROXY_API_KEY,
        "OPENROUTER_BASE_URL": base_url,
        "TERRAGON_API_KEY_PEPPER": settings.TERRAGON_API_KEY_PEPPER,
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,
        "LOG_LEVEL": "WARNING",
        # Metrics of this server only, not added to the developer's.
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="test-metrics-"),
        **{name: str(value) for name, value in env.items()},
    }


def uvicorn_command(port: int, workers: int, app: str = "terragon.asgi:application") -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server as an operator would (SIGINT), killing it if it hangs."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def uvicorn_workers(workers: int, base_url: str, **env: Any) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        uvicorn_command(port, workers), cwd=ROOT, env=server_environment(base_url, **env)
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.options(f"{url}/api/proxy/openrouter", timeout=1).status_code == 204
        except httpx.HTTPError:
            return False

    try:
        if not wait_until(ready, timeout=30, interval=0.1):
            raise RuntimeError("uvicorn workers did not start")
        yield url
    finally:
        stop_process(process)
