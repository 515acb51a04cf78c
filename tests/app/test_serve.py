"""``manage.py serve`` (``make run``): the demo user and a token that survives restarts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from terragon.apikeys.models import ApiKey
from terragon.management.commands.serve import DEMO_TOKEN_FILE, Command


def prepare() -> tuple[str, str]:
    out = io.StringIO()
    token = Command(stdout=out).prepare_demo_user()
    return token, out.getvalue()


@pytest.mark.django_db
def test_make_run_reuses_its_demo_token_between_starts(settings: Any, tmp_path: Path) -> None:
    settings.VAR_DIR = tmp_path
    first, said = prepare()
    assert "Issued a new demo token" in said
    assert (tmp_path / DEMO_TOKEN_FILE).read_text() == first
    assert (tmp_path / DEMO_TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    second, said = prepare()
    assert second == first
    assert "Reusing the demo token" in said
    assert ApiKey.objects.filter(name="make-run").count() == 1


@pytest.mark.django_db
def test_a_revoked_or_foreign_demo_token_is_replaced(settings: Any, tmp_path: Path) -> None:
    settings.VAR_DIR = tmp_path
    first, _ = prepare()
    ApiKey.objects.filter(name="make-run").update(revoked_at=timezone.now())
    second, said = prepare()
    assert second != first
    assert "Issued a new demo token" in said
    (tmp_path / DEMO_TOKEN_FILE).write_text("not-a-token")
    third, _ = prepare()
    assert third not in (first, second)
    assert (tmp_path / DEMO_TOKEN_FILE).read_text() == third
