"""Count the database statements of one proxied request, before and after the upstream call.

Runs the site in this process (uvicorn in a thread) against a fake OpenRouter
that notes when each request reaches it, and records every SQL statement with
its start time: through a Django execute wrapper for the ORM's connections, and
around psycopg's asynchronous cursor for the statements the event loop runs
itself (the admission, on PostgreSQL). Prints one line.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "terragon.settings")
django.setup()

import httpx  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.db.backends.signals import connection_created  # noqa: E402

from devtools.fake_openrouter import FakeOpenRouter  # noqa: E402
from devtools.servers import serve_in_thread  # noqa: E402
from terragon.apikeys.models import ApiKey  # noqa: E402

statements: list[tuple[float, str]] = []
lock = threading.Lock()


def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    with lock:
        statements.append((time.perf_counter(), sql))
    return execute(sql, params, many, context)


def watch_the_loops_cursor() -> None:
    """Note each statement the event loop sends through psycopg's asynchronous cursors.

    Both kinds: the server-binding one (prepared statements, the default) and
    the client-binding one (``BILLING_PREPARED_STATEMENTS = False``).
    """
    import psycopg

    def watched(real: Any) -> Any:
        async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                statements.append((time.perf_counter(), str(query)))
            return await real(self, query, *args, **kwargs)

        return execute

    for kind in (psycopg.AsyncCursor, psycopg.AsyncClientCursor):
        if "execute" in vars(kind):  # once for a method the other inherits
            kind.execute = watched(kind.execute)  # type: ignore[method-assign]


def install(sender: Any, connection: Any, **kwargs: Any) -> None:
    if record not in connection.execute_wrappers:
        connection.execute_wrappers.append(record)


class Arrivals:
    """The fake, noting when each completion request arrives."""

    def __init__(self) -> None:
        self.app = FakeOpenRouter()
        self.times: list[float] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/completions"):
            self.times.append(time.perf_counter())
        await self.app(scope, receive, send)


def describe(sqls: list[str]) -> str:
    kinds = Counter(" ".join(sql.split()[:1]).upper() for sql in sqls)
    return ", ".join(f"{count} {kind}" for kind, count in kinds.items()) or "none"


def main() -> None:
    connection_created.connect(install)
    watch_the_loops_cursor()
    user = get_user_model().objects.get(username="bench0")
    _, token = ApiKey.objects.issue(user, name="statements")
    fake = Arrivals()
    with serve_in_thread(fake, lifespan="off") as fake_url:
        settings.OPENROUTER_PROXY_BASE_URL = f"{fake_url}/api"
        from terragon.asgi import application

        with serve_in_thread(application) as url:
            body = {
                "model": "x-ai/grok-code-fast-1",
                "messages": [{"role": "user", "content": "x"}],
            }
            with httpx.Client(base_url=url, headers={"X-Daemon-Token": token}) as client:
                for _ in range(3):  # warm up: the first use of a key also notes last_used_at
                    client.post("/api/proxy/openrouter/v1/chat/completions", json=body)
                time.sleep(0.2)
                with lock:
                    statements.clear()
                sent = time.perf_counter()
                client.post("/api/proxy/openrouter/v1/chat/completions", json=body)
                time.sleep(0.2)
                finished = time.perf_counter()  # before the servers stop (and retire)
    arrived = fake.times[-1]
    before = [sql for at, sql in statements if sent <= at < arrived]
    after = [sql for at, sql in statements if arrived <= at < finished]
    print(
        f"{len(before)} before the upstream call ({describe(before)}), "
        f"{len(after)} after it ({describe(after)})"
    )


if __name__ == "__main__":
    main()
