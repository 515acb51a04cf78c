"""Server processes for reliability tests: like ``tests.support.processes.uvicorn_workers``,
plus what those tests need to watch them: the pids of the workers, a log file
to search afterwards, the probe endpoint, and a database URL of their own.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from tests.support.faults.probe import PROBE_PATH
from tests.support.faults.procfs import worker_pids
from tests.support.processes import (
    ROOT,
    database_url,
    free_port,
    server_environment,
    stop_process,
    uvicorn_command,
)
from tests.support.servers import wait_until


def database_url_via(port: int) -> str:
    """The test database's URL, reached through ``127.0.0.1:port`` instead.

    ``pool_timeout`` is lowered so requests fail fast while the database is cut.
    """
    parts = urlsplit(database_url())
    user = parts.username or "postgres"
    password = f":{parts.password}" if parts.password else ""
    return urlunsplit(
        (parts.scheme, f"{user}{password}@127.0.0.1:{port}", parts.path, "pool_timeout=2", "")
    )


@dataclass
class ServerProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    workers: list[int] = field(default_factory=list)

    @property
    def proxy(self) -> str:
        return f"{self.url}/api/proxy/openrouter"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def probe(self, client: httpx.Client | None = None) -> dict[str, Any]:
        getter = client.get if client is not None else httpx.get
        response = getter(f"{self.url}{PROBE_PATH}", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def probe_all(self, attempts: int = 200) -> dict[int, dict[str, Any]]:
        """One probe of every worker (the kernel picks which worker accepts)."""
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(attempts):
            snapshot = self.probe()
            seen.setdefault(snapshot["pid"], snapshot)
            if set(seen) >= set(self.workers):
                break
        return seen


@contextlib.contextmanager
def server_process(
    workers: int,
    base_url: str,
    log_path: Path,
    app: str = "tests.support.faults.probe:application",
    **env: Any,
) -> Iterator[ServerProcess]:
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        uvicorn_command(port, workers, app),
        cwd=ROOT,
        env=server_environment(base_url, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = ServerProcess(
        url=f"http://127.0.0.1:{port}", port=port, process=process, log_path=log_path
    )

    def ready() -> bool:
        try:
            response = httpx.options(f"{server.proxy}", timeout=1)
        except httpx.HTTPError:
            return False
        return response.status_code == 204 and len(worker_pids(port)) >= workers

    try:
        if not wait_until(ready, timeout=30, interval=0.1):
            raise RuntimeError(f"uvicorn did not start; its log:\n{server.log()}")
        server.workers = worker_pids(port)
        yield server
    finally:
        stop_process(process)
        log.close()
        # Let the workers' last log lines land before anyone reads the file.
        time.sleep(0.05)
