from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from hypothesis import settings as settings_profiles

from billing.services import grant_credits
from devtools.fake_openrouter import (
    FakeOpenRouter,
    RunningFake,
    run_fake_openrouter,
)
from terragon.apikeys.models import ApiKey
from tests.servers import serve_in_thread

SERVER_KEY = "sk-or-test-server-key-0123456789"

# One line per test client request would drown the output of a failing test.
logging.getLogger("httpx").setLevel(logging.WARNING)

# In CI, property tests try the same examples on every run: a failure there is
# reproducible, never a new random find. Locally they keep exploring.
settings_profiles.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings_profiles.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def _close_proxy_db_threads(django_db_setup: None) -> Iterator[None]:
    """The proxy's database threads keep connections: close them before the test DB goes."""
    yield
    from openrouter_proxy import db

    db.shutdown()


@pytest.fixture(autouse=True)
def _isolated_settings(settings: Any, tmp_path: Any) -> None:
    settings.OPENROUTER_PROXY_API_KEY = SERVER_KEY
    settings.BILLING_SPOOL_DIR = tmp_path / "spool"
    settings.OPENROUTER_PROXY_SETTLE_DELAYS = (0.3, 0.3, 0.5, 1, 1)
    settings.BILLING_RECORD_RETRY_DELAY = 0.01
    # Tests revoke and expire keys and expect the next request to see it.
    settings.OPENROUTER_PROXY_KEY_CACHE_SECONDS = 0
    settings.OPENROUTER_PROXY_ENDPOINTS = ECHO_ENDPOINTS


#: The fake's echo route, opened for the tests of what crosses the proxy.
ECHO_ENDPOINTS = [{"path": "echo/**", "policy": "open", "methods": ["GET", "POST", "PUT"]}]


BROKEN_VERIFIER = "tests.conftest.broken_verifier"


def broken_verifier(token: str) -> None:
    """A key verifier whose database is unreachable (point the setting at BROKEN_VERIFIER)."""
    from django.db import OperationalError

    raise OperationalError("could not connect to server: Connection refused")


@dataclass
class Account:
    user: Any
    token: str
    key: ApiKey

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Daemon-Token": self.token}


def make_account(username: str = "alice", credit: Decimal | str | None = "10") -> Account:
    user = get_user_model().objects.create_user(username=username, email=f"{username}@example.com")
    if credit is not None and Decimal(credit) != 0:
        grant_credits(user, Decimal(credit), note="test credit")
    key, token = ApiKey.objects.issue(user, name="test")
    return Account(user=user, token=token, key=key)


@pytest.fixture
def account(db: None) -> Account:
    return make_account()


@pytest.fixture
def fake() -> Iterator[RunningFake]:
    with run_fake_openrouter(FakeOpenRouter(generation_delay=0.2, api_key=SERVER_KEY)) as running:
        yield running


@dataclass
class Gateway:
    url: str
    fake: RunningFake

    @property
    def proxy(self) -> str:
        return f"{self.url}/api/proxy/openrouter"


@pytest.fixture
def gateway(transactional_db: None, fake: RunningFake, settings: Any) -> Iterator[Gateway]:
    """The whole site under a real uvicorn server, proxying to the fake OpenRouter."""
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    from terragon.asgi import application

    with serve_in_thread(application) as url:
        yield Gateway(url=url, fake=fake)


@pytest.fixture
def live_account(transactional_db: None) -> Account:
    return make_account()
