from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from hypothesis import settings as settings_profiles

from devtools.fake_openrouter import (
    FakeOpenRouter,
    RunningFake,
    run_fake_openrouter,
)

# The shared helpers assert too: their failures read like a test's (before they are imported).
pytest.register_assert_rewrite("tests.support")

from tests.support.accounts import (  # noqa: E402
    ECHO_ENDPOINTS,
    SERVER_KEY,
    Account,
    Gateway,
    make_account,
)
from tests.support.servers import serve_in_thread  # noqa: E402
from tests.support.waiting import after_records  # noqa: E402

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
    # The test process serves in threads between tests: freezing its objects at each
    # server's start would keep every earlier test's garbage (workers do freeze).
    settings.OPENROUTER_PROXY_GC_FREEZE = False


@pytest.fixture
def account(db: None) -> Account:
    return make_account()


@pytest.fixture
def fake() -> Iterator[RunningFake]:
    with run_fake_openrouter(FakeOpenRouter(generation_delay=0.2, api_key=SERVER_KEY)) as running:
        yield running


@pytest.fixture
def gateway(transactional_db: None, fake: RunningFake, settings: Any) -> Iterator[Gateway]:
    """The whole site under a real uvicorn server, proxying to the fake OpenRouter.

    The server writes a request's record just after its response has ended;
    the test's queries wait for the records of every ended request first, so
    a test reads the books as they stand once its responses are recorded.
    """
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    from terragon.asgi import application

    with serve_in_thread(application) as url, connection.execute_wrapper(after_records):
        yield Gateway(url=url, fake=fake)


@pytest.fixture
def live_account(transactional_db: None) -> Account:
    return make_account()
