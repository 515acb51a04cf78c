"""Turn ``DATABASE_URL`` into a Django ``DATABASES`` entry.

Two schemes are understood: ``sqlite:///relative/or/absolute/path`` and
``postgres://user:password@host:port/name?option=value``. PostgreSQL gets
psycopg's connection pool and ``CONN_MAX_AGE = 0``, which is what an ASGI
server needs: connections go back to the pool instead of living in whichever
thread last touched them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

POSTGRES_SCHEMES = {"postgres", "postgresql", "pgsql"}


def parse_database_url(url: str, base_dir: Path) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        raw = unquote(parts.path)
        if raw.startswith("//"):
            # sqlite:////abs/path keeps its leading slash.
            path = Path(raw[1:])
        else:
            relative = raw.lstrip("/")
            path = Path(relative) if Path(relative).is_absolute() else base_dir / relative
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(path),
            # BEGIN IMMEDIATE: a transaction takes the write lock up front, so
            # read-then-write sequences cannot interleave across processes.
            # WAL lets readers run beside the one writer.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL",
            },
            # Tests use a file too, so that server threads and processes share
            # it; one per test process, so that two runs in one checkout do not
            # drop each other's database.
            "TEST": {"NAME": str(path.with_name(f"test_{os.getpid()}_{path.name}"))},
        }
    if parts.scheme in POSTGRES_SCHEMES:
        options: dict[str, Any] = dict(parse_qsl(parts.query))
        pool = {
            "min_size": int(options.pop("pool_min_size", 1)),
            "max_size": int(options.pop("pool_max_size", 20)),
            "timeout": float(options.pop("pool_timeout", 5)),
            # Give up on a failing connection attempt after a few seconds, so a
            # new one (with its backoff reset) is tried when the database is
            # back, instead of pausing for minutes between attempts.
            "reconnect_timeout": float(options.pop("pool_reconnect_timeout", 5)),
        }
        options.setdefault("connect_timeout", "3")
        options["pool"] = pool
        name = unquote(parts.path.lstrip("/")) or "postgres"
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "CONN_MAX_AGE": 0,
            "OPTIONS": options,
            # One test database per test process (as for SQLite): two runs on one
            # server would otherwise create, and drop, the same test_<name>.
            # (PostgreSQL identifiers stop at 63 bytes: the name gives way, not the pid.)
            "TEST": {"NAME": f"test_{name[:48]}_{os.getpid()}"},
        }
    raise ValueError(f"Unsupported DATABASE_URL scheme {parts.scheme!r}: use sqlite or postgres.")
