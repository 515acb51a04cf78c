"""DATABASE_URL parsing: what two test runs on one machine must not share."""

from __future__ import annotations

import os
from pathlib import Path

from terragon.database_url import parse_database_url


def test_postgres_test_database_is_per_process() -> None:
    parsed = parse_database_url("postgres://ci@127.0.0.1:5432/gateway", Path("/srv"))
    assert parsed["NAME"] == "gateway"
    assert parsed["TEST"]["NAME"] == f"test_gateway_{os.getpid()}"


def test_postgres_test_database_name_fits_an_identifier() -> None:
    parsed = parse_database_url("postgres://ci@127.0.0.1/" + "d" * 70, Path("/srv"))
    assert len(parsed["TEST"]["NAME"]) <= 63
    assert parsed["TEST"]["NAME"].endswith(f"_{os.getpid()}")


def test_sqlite_test_database_is_per_process() -> None:
    parsed = parse_database_url("sqlite:///var/db.sqlite3", Path("/srv"))
    assert parsed["NAME"] == "/srv/var/db.sqlite3"
    assert parsed["TEST"]["NAME"] == f"/srv/var/test_{os.getpid()}_db.sqlite3"
