"""The operators' admin in a real browser: headless Chromium, driven by Selenium.

Logs in, looks at the dashboard and the users' page, grants $20 through the
form and finds the new balance and the ledger row. Screenshots go to
``var/artifacts/``. Skipped (with the reason) where Chromium or its driver is
not installed: ``apt-get install chromium chromium-driver``.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.utils import timezone

from billing.models import CostSource, CreditLedgerEntry, Outcome, Settlement, UsageRecord
from billing.services import balance_of
from tests.conftest import make_account
from tests.servers import serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(django_settings.BASE_DIR) / "var" / "artifacts"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="headless Chromium not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def site(transactional_db: None) -> Iterator[str]:
    """The whole site under uvicorn, with the admin's static files served too."""
    from terragon.asgi import application

    with serve_in_thread(ASGIStaticFilesHandler(application)) as url:  # type: ignore[arg-type]
        yield url


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def seed_usage(user: Any) -> None:
    models = ["x-ai/grok-code-fast-1", "qwen/qwen3-coder", "moonshotai/kimi-k2-0905"]
    now = timezone.now()
    records = []
    for day in range(30):
        for index in range(3 + day % 4):
            model = models[(day + index) % len(models)]
            failed = index == 4
            records.append(
                UsageRecord(
                    request_id=uuid.uuid4(),
                    user=user,
                    model=model,
                    requested_model=model,
                    endpoint="chat/completions",
                    streamed=True,
                    outcome=Outcome.UPSTREAM_ERROR if failed else Outcome.COMPLETED,
                    settlement=Settlement.SETTLED,
                    cost_source=CostSource.NONE if failed else CostSource.PROVIDER,
                    prompt_tokens=1200 * (index + 1),
                    completion_tokens=300,
                    billed=Decimal(0) if failed else Decimal("0.0125") * (1 + (day * index) % 7),
                    upstream_latency_ms=2500,
                    created_at=now - timedelta(days=day, minutes=index * 7),
                )
            )
    UsageRecord.objects.bulk_create(records)


def shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"admin-{name}.png"
    # The whole page, not just the window.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1440, max(900, min(int(height) + 40, 4000)))
    driver.save_screenshot(str(path))
    return path


def test_operator_grants_credits_in_the_browser(site: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    get_user_model().objects.create_superuser("ops", "ops@example.com", "correct-horse-9")
    alice = make_account("alice", credit="10")
    bob = make_account("bob", credit="3")
    seed_usage(alice.user)
    seed_usage(bob.user)

    browser.get(f"{site}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys("ops")
    browser.find_element(By.NAME, "password").send_keys("correct-horse-9")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert "spend and usage" in browser.find_element(By.ID, "content-main").text.lower()
    shot(browser, "index")

    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    assert browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert "x-ai/grok-code-fast-1" in browser.find_element(By.CSS_SELECTOR, ".legend").text
    # The admin's own stylesheet arrived (served beside the ASGI app).
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "")
    shot(browser, "dashboard")

    browser.find_element(By.LINK_TEXT, "Users' usage and billing").click()
    table = browser.find_element(By.ID, "result_list")
    assert "alice" in table.text
    assert "bob" in table.text
    shot(browser, "users")

    row = browser.find_element(By.XPATH, "//tr[.//strong[text()='alice']]")
    row.find_element(By.LINK_TEXT, "Grant credits").click()
    browser.find_element(By.NAME, "amount").send_keys("20")
    browser.find_element(By.NAME, "note").send_keys("Welcome credit")
    shot(browser, "grant-form")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit][value='Write ledger entry']").click()

    message = browser.find_element(By.CSS_SELECTOR, "ul.messagelist li.success").text
    assert "the balance is now $30.00" in message
    assert balance_of(alice.user) == Decimal(30)
    row = browser.find_element(By.XPATH, "//tr[.//strong[text()='alice']]")
    assert "$30.00" in row.find_element(By.CSS_SELECTOR, "td.field-balance_display").text
    shot(browser, "users-after-grant")

    browser.find_element(By.LINK_TEXT, "See the ledger").click()
    ledger = browser.find_element(By.ID, "result_list").text
    assert "$20.00" in ledger
    assert "Welcome credit" in ledger
    assert "ops" in ledger
    shot(browser, "ledger")
    entry = CreditLedgerEntry.objects.get(note="Welcome credit")
    assert entry.actor is not None
    assert entry.actor.get_username() == "ops"
