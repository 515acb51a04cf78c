"""One test per system check id."""

from __future__ import annotations

from typing import Any

import pytest

from billing.checks import check_billing_settings
from openrouter_proxy.checks import check_proxy_settings

UNIMPORTABLE = "tests.support.unimportable_verifier"


def ids(messages: list[Any]) -> list[str]:
    return [message.id for message in messages]


def test_defaults_are_clean(settings: Any) -> None:
    assert check_proxy_settings() == []
    assert check_billing_settings() == []


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("OPENROUTER_PROXY_BASE_URL", "ftp://openrouter.ai/api", "openrouter_proxy.E001"),
        ("OPENROUTER_PROXY_BASE_URL", "https://openrouter.ai/api?x=1", "openrouter_proxy.E001"),
        ("OPENROUTER_PROXY_KEY_VERIFIER", "no.such.module.verify", "openrouter_proxy.E002"),
        ("OPENROUTER_PROXY_KEY_VERIFIER", "", "openrouter_proxy.E002"),
        # A module that raises while it is imported is an error to report, not a crash.
        ("OPENROUTER_PROXY_KEY_VERIFIER", f"{UNIMPORTABLE}.verify", "openrouter_proxy.E002"),
        (
            "OPENROUTER_PROXY_KEY_VERIFIER",
            "openrouter_proxy.conf.DEFAULT_CORS_ALLOW_HEADERS",
            "openrouter_proxy.E002",
        ),
        ("OPENROUTER_PROXY_METER", "no.such.module.Meter", "openrouter_proxy.E009"),
        ("OPENROUTER_PROXY_METER", f"{UNIMPORTABLE}.Meter", "openrouter_proxy.E009"),
        # Importable, but what it makes has none of a meter's methods.
        ("OPENROUTER_PROXY_METER", "openrouter_proxy.conf.ProxySettings", "openrouter_proxy.E009"),
        ("OPENROUTER_PROXY_ALLOWED_MODELS", [], "openrouter_proxy.E003"),
        ("OPENROUTER_PROXY_ALLOWED_MODELS", ["x-ai/*", ""], "openrouter_proxy.E003"),
        ("OPENROUTER_PROXY_READ_TIMEOUT", 0, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_MAX_BODY_BYTES", -1, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_CONNECT_TIMEOUT", "soon", "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_WRITE_TIMEOUT", 0, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_POOL_TIMEOUT", -1, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_MAX_CONNECTIONS", 0, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_DB_THREADS", 0, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_SETTLE_DELAYS", (1, -1), "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_KEY_CACHE_SECONDS", -1, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_SHUTDOWN_GRACE", "later", "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_CORS_MAX_AGE", -5, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_TRANSPORT", "curl", "openrouter_proxy.E005"),
        ("OPENROUTER_PROXY_APP_TITLE", "Terragon \u2014 gateway", "openrouter_proxy.E006"),
        ("OPENROUTER_PROXY_APP_URL", "https://x.example/\n", "openrouter_proxy.E006"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "sometimes")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("/v1/x", "open")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/*x", "open")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "metered")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "metered", "telepathy")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "open", "usage")], "openrouter_proxy.E007"),
        (
            "OPENROUTER_PROXY_ENDPOINTS",
            [("v1/generation", "own_generation")],
            "openrouter_proxy.E007",
        ),
        (
            "OPENROUTER_PROXY_ENDPOINTS",
            [{"path": "v1/x", "policy": "open", "verbs": []}],
            "openrouter_proxy.E007",
        ),
        ("OPENROUTER_PROXY_ENDPOINTS", ["v1/x"], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_METRICS_ALLOWED_IPS", ["127.0.0.1", "lan"], "openrouter_proxy.E008"),
        ("OPENROUTER_PROXY_METRICS_ALLOWED_IPS", "127.0.0.1", "openrouter_proxy.E008"),
        ("OPENROUTER_PROXY_METRICS_TOKEN", 1234, "openrouter_proxy.E008"),
        ("OPENROUTER_PROXY_GC_FREEZE", "yes", "openrouter_proxy.E010"),
        ("OPENROUTER_PROXY_GC_FREEZE", 1, "openrouter_proxy.E010"),
        ("OPENROUTER_PROXY_API_KEY", "", "openrouter_proxy.W001"),
    ],
)
def test_proxy_checks(settings: Any, name: str, value: Any, check_id: str) -> None:
    setattr(settings, name, value)
    assert ids(check_proxy_settings()) == [check_id]


def test_valid_endpoint_entries_pass(settings: Any) -> None:
    settings.OPENROUTER_PROXY_ENDPOINTS = [
        ("v1/models/user", "open"),
        ("v1/chat/completions", "closed"),
        ("v1/private/**", "metered", "usage"),
        {"path": "v1/tools/{name}", "policy": "open", "methods": ["GET", "POST"]},
    ]
    assert check_proxy_settings() == []


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("BILLING_MARKUP", "-1", "billing.E001"),
        ("BILLING_MARKUP", "lots", "billing.E001"),
        ("BILLING_MAX_IN_FLIGHT", 0, "billing.E002"),
        ("BILLING_IN_FLIGHT_LEASE", "x", "billing.E002"),
        ("BILLING_CREDITS_LOW_THRESHOLD", "low", "billing.E003"),
        ("BILLING_RATE_WINDOW_SECONDS", 0, "billing.E004"),
        ("BILLING_SPOOL_DIR", 42, "billing.E005"),
        ("BILLING_RECORD_ATTEMPTS", 0, "billing.E005"),
        ("BILLING_RECORD_RETRY_DELAY", -1, "billing.E005"),
        ("BILLING_KEY_ADMIN", "apikeys.NoSuchModel", "billing.E006"),
        ("BILLING_ADMISSION_CONNECTIONS", 0, "billing.E008"),
        ("BILLING_ADMISSION_CONNECTIONS", "many", "billing.E008"),
        ("BILLING_ADMISSION_CONNECTIONS", True, "billing.E008"),
        ("BILLING_PREPARED_STATEMENTS", "yes", "billing.E009"),
        ("BILLING_PREPARED_STATEMENTS", 1, "billing.E009"),
        ("BILLING_KEY_ADMIN", "nonsense", "billing.E006"),
        ("BILLING_WORKER_HEARTBEAT", 0, "billing.E007"),
        ("BILLING_WORKER_STALE_AFTER", 5, "billing.E007"),
    ],
)
def test_billing_checks(settings: Any, name: str, value: Any, check_id: str) -> None:
    setattr(settings, name, value)
    assert ids(check_billing_settings()) == [check_id]


def _settings_of(conf: type, prefix: str) -> set[str]:
    return {f"{prefix}{name}" for name, value in vars(conf).items() if isinstance(value, property)}


def _cases(test: Any) -> set[str]:
    marks = [mark for mark in test.pytestmark if mark.name == "parametrize"]
    return {case[0] for mark in marks for case in mark.args[1]}


def test_every_setting_has_a_check_case() -> None:
    """A new setting without a case in the tables above fails here."""
    from billing.conf import BillingSettings
    from openrouter_proxy.conf import ProxySettings

    proxy = _settings_of(ProxySettings, "OPENROUTER_PROXY_") | {
        "OPENROUTER_PROXY_METRICS_ALLOWED_IPS",
        "OPENROUTER_PROXY_METRICS_TOKEN",
    }
    assert proxy - _cases(test_proxy_checks) == set()
    assert _settings_of(BillingSettings, "BILLING_") - _cases(test_billing_checks) == set()


def test_the_registered_check_ids() -> None:
    """The ids each app reports, all at once: every setting wrong together."""
    from django.test import override_settings

    wrong = {
        "OPENROUTER_PROXY_BASE_URL": "ftp://x",
        "OPENROUTER_PROXY_KEY_VERIFIER": "",
        "OPENROUTER_PROXY_METER": "no.such.Meter",
        "OPENROUTER_PROXY_ALLOWED_MODELS": [],
        "OPENROUTER_PROXY_READ_TIMEOUT": 0,
        "OPENROUTER_PROXY_TRANSPORT": "curl",
        "OPENROUTER_PROXY_APP_TITLE": "\n",
        "OPENROUTER_PROXY_ENDPOINTS": ["v1/x"],
        "OPENROUTER_PROXY_METRICS_TOKEN": 1,
        "OPENROUTER_PROXY_GC_FREEZE": None,
        "OPENROUTER_PROXY_API_KEY": "",
        "BILLING_MARKUP": "-1",
        "BILLING_MAX_IN_FLIGHT": 0,
        "BILLING_CREDITS_LOW_THRESHOLD": "low",
        "BILLING_RATE_WINDOW_SECONDS": 0,
        "BILLING_RECORD_ATTEMPTS": 0,
        "BILLING_KEY_ADMIN": "x.Y",
        "BILLING_WORKER_HEARTBEAT": "often",
    }
    with override_settings(**wrong):
        assert ids(check_proxy_settings()) == [
            "openrouter_proxy.E001",
            "openrouter_proxy.E002",
            "openrouter_proxy.E009",
            "openrouter_proxy.E003",
            "openrouter_proxy.E004",
            "openrouter_proxy.E005",
            "openrouter_proxy.E006",
            "openrouter_proxy.E010",
            "openrouter_proxy.E007",
            "openrouter_proxy.E008",
            "openrouter_proxy.W001",
        ]
        assert ids(check_billing_settings()) == [
            "billing.E001",
            "billing.E002",
            "billing.E003",
            "billing.E004",
            "billing.E007",
            "billing.E005",
            "billing.E006",
        ]


def test_a_host_without_a_verifier_gets_a_check_error_not_a_crash(settings: Any) -> None:
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    del settings.OPENROUTER_PROXY_KEY_VERIFIER
    with pytest.raises(SystemCheckError, match=r"openrouter_proxy\.E002.*is not set"):
        call_command("check")


def test_settings_are_read_once_and_forgotten_when_a_setting_changes(settings: Any) -> None:
    from django.test import override_settings

    from billing.conf import billing_settings
    from openrouter_proxy.conf import proxy_settings

    settings.OPENROUTER_PROXY_MAX_BODY_BYTES = 123
    assert proxy_settings.MAX_BODY_BYTES == 123
    assert vars(proxy_settings)["MAX_BODY_BYTES"] == 123  # remembered
    with override_settings(OPENROUTER_PROXY_MAX_BODY_BYTES=456):
        assert proxy_settings.MAX_BODY_BYTES == 456
    assert proxy_settings.MAX_BODY_BYTES == 123
    settings.BILLING_MAX_IN_FLIGHT = 3
    assert billing_settings.MAX_IN_FLIGHT == 3
    settings.BILLING_MAX_IN_FLIGHT = 4  # any setting's change forgets every remembered one
    assert billing_settings.MAX_IN_FLIGHT == 4
    settings.OPENROUTER_PROXY_MAX_BODY_BYTES = "lots"
    with pytest.raises(ValueError, match="invalid literal"):
        proxy_settings.MAX_BODY_BYTES  # noqa: B018
    assert "MAX_BODY_BYTES" not in vars(proxy_settings)  # a value that fails is not kept
