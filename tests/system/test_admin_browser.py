"""The operators' admin in a real browser: headless Chromium, driven by Selenium.

Logs in, looks at the dashboard and the users' page, grants $20 through the
form and finds the new balance and the ledger row. Screenshots go to
``var/artifacts/``. Skipped (with the reason) where Chromium or its driver is
not installed: ``apt-get install chromium chromium-driver``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import CostSource, CreditLedgerEntry, Outcome, Settlement, UsageRecord
from billing.services import balance_of
from tests.support.accounts import make_account
from tests.support.servers import serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(django_settings.BASE_DIR) / "var" / "artifacts"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="headless Chromium not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def site(transactional_db: None) -> Iterator[str]:
    """The whole site under uvicorn, exactly as served (its static files included)."""
    from terragon.asgi import application

    with serve_in_thread(application) as url:
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
    # Written aside, then renamed: two runs at once never leave a torn file.
    partial = path.with_name(f".{path.stem}.{os.getpid()}.png")
    driver.save_screenshot(str(partial))
    partial.replace(path)
    return path


def follow(driver: Any, element: Any, path: str) -> None:
    """Click ``element`` and wait until the next page, at ``path``, has loaded.

    Without this, a lookup right after a click can run on the page being
    left (its ``#result_list``, say) or on one still loading.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    old_page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    wait = WebDriverWait(driver, 15)
    wait.until(expected_conditions.staleness_of(old_page), f"the page after {path} to unload")
    wait.until(
        lambda d: (
            urlsplit(d.current_url).path.startswith(path)
            and d.execute_script("return document.readyState") == "complete"
        ),
        f"{path} to load",
    )


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
    follow(browser, browser.find_element(By.CSS_SELECTOR, "input[type=submit]"), "/admin/")
    assert "spend and usage" in browser.find_element(By.ID, "content-main").text.lower()
    shot(browser, "index")

    dashboard = browser.find_element(By.LINK_TEXT, "Dashboard")
    follow(browser, dashboard, urlsplit(dashboard.get_attribute("href")).path)
    assert browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert "x-ai/grok-code-fast-1" in browser.find_element(By.CSS_SELECTOR, ".legend").text
    # The admin's own stylesheet arrived (served by the site itself, DEBUG off).
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "")
    shot(browser, "dashboard")

    users = browser.find_element(By.LINK_TEXT, "Users' usage and billing")
    users_path = urlsplit(users.get_attribute("href")).path
    follow(browser, users, users_path)
    table = browser.find_element(By.ID, "result_list")
    assert "alice" in table.text
    assert "bob" in table.text
    shot(browser, "users")

    row = browser.find_element(By.XPATH, "//tr[.//strong[text()='alice']]")
    grant = row.find_element(By.LINK_TEXT, "Grant credits")
    follow(browser, grant, urlsplit(grant.get_attribute("href")).path)
    browser.find_element(By.NAME, "amount").send_keys("20")
    browser.find_element(By.NAME, "note").send_keys("Welcome credit")
    shot(browser, "grant-form")
    submit = browser.find_element(By.CSS_SELECTOR, "input[type=submit][value='Write ledger entry']")
    follow(browser, submit, users_path)

    message = browser.find_element(By.CSS_SELECTOR, "ul.messagelist li.success").text
    assert "the balance is now $30.00" in message
    assert balance_of(alice.user) == Decimal(30)
    row = browser.find_element(By.XPATH, "//tr[.//strong[text()='alice']]")
    assert "$30.00" in row.find_element(By.CSS_SELECTOR, "td.field-balance_display").text
    shot(browser, "users-after-grant")

    ledger_link = browser.find_element(By.LINK_TEXT, "See the ledger")
    follow(browser, ledger_link, urlsplit(ledger_link.get_attribute("href")).path)
    ledger = browser.find_element(By.ID, "result_list").text
    assert "$20.00" in ledger
    assert "Welcome credit" in ledger
    assert "ops" in ledger
    shot(browser, "ledger")
    entry = CreditLedgerEntry.objects.get(note="Welcome credit")
    assert entry.actor is not None
    assert entry.actor.get_username() == "ops"
