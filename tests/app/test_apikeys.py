from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from openrouter_proxy.callers import ApiKeyRejected, extract_token
from terragon.apikeys.models import ApiKey
from terragon.apikeys.tokens import PREFIX_LENGTH, parse_token
from terragon.apikeys.verifier import verify_api_key
from tests.support.accounts import Account


def test_token_format(account: Account) -> None:
    marker, prefix, secret = account.token.split("_", 2)
    assert marker == "tg"
    assert len(prefix) == PREFIX_LENGTH == len(account.key.prefix)
    assert prefix == account.key.prefix
    assert len(secret) >= 43  # 32 random bytes, URL-safe base64
    assert secret not in account.key.secret_hash
    assert len(account.key.secret_hash) == 64


def test_valid_key_verifies(account: Account) -> None:
    caller = verify_api_key(account.token)
    assert caller is not None
    assert caller.user == account.user
    assert caller.key_id == account.key.pk
    assert caller.key_label == f"tg_{account.key.prefix}"


def test_the_key_is_loaded_in_one_statement_as_the_orm_loads_it(
    account: Account, django_assert_num_queries: Any
) -> None:
    from decimal import Decimal

    from terragon.apikeys.verifier import KEY_FIELDS, USER_FIELDS, _find_key

    key = account.key
    key.expires_at = timezone.now() + timedelta(days=3)
    key.spend_limit = Decimal("12.345678901234")
    key.daily_spend_limit = Decimal("0.5")
    key.requests_per_minute = 30
    key.last_used_at = timezone.now() - timedelta(hours=1)
    key.save()
    with django_assert_num_queries(1):
        found = _find_key(key.prefix)
        assert found is not None
        loaded = [getattr(found, name) for name in KEY_FIELDS if name != "user"]
        user = [getattr(found.user, name) for name in USER_FIELDS]
    orm = ApiKey.objects.select_related("user").get(pk=key.pk)
    assert loaded == [getattr(orm, name) for name in KEY_FIELDS if name != "user"]
    assert user == [getattr(orm.user, name) for name in USER_FIELDS]
    assert found.user_id == orm.user_id
    assert found.limits == orm.limits
    assert found.limits.spend_limit == Decimal("12.345678901234")
    assert found.expires_at is not None
    assert found.expires_at.tzinfo is not None  # aware, on SQLite too
    assert found.get_deferred_fields() >= {"name", "created_at"}  # the rest loads on demand
    assert found.name == orm.name
    assert _find_key("nosuchprefix") is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "",
        lambda t: "garbage",
        lambda t: t[:-1],
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: t.replace("tg_", "sk_", 1),
        lambda t: t + "x" * 200,
        lambda t: t.upper(),
        lambda t: t.replace("_", "-"),
        lambda t: "tg_" + "a" * PREFIX_LENGTH + "_" + t.split("_", 2)[2],
        lambda t: t + "é",
        lambda t: "tg_\u0430" + t[4:],
    ],
)
def test_malformed_or_forged_tokens_are_invalid(account: Account, mangle: Any) -> None:
    assert verify_api_key(mangle(account.token)) is None


def test_another_users_prefix_with_a_forged_secret_is_invalid(account: Account) -> None:
    other_secret = ApiKey.objects.issue(account.user, name="other")[1].split("_", 2)[2]
    forged = f"tg_{account.key.prefix}_{other_secret}"
    assert verify_api_key(forged) is None


def test_revoked_key_is_rejected_and_revocation_is_one_way(account: Account) -> None:
    assert account.key.revoke() is True
    assert account.key.revoke() is False
    with pytest.raises(ApiKeyRejected, match="revoked"):
        verify_api_key(account.token)


def test_expired_key_is_rejected(account: Account) -> None:
    ApiKey.objects.filter(pk=account.key.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    with pytest.raises(ApiKeyRejected, match="expired"):
        verify_api_key(account.token)


def test_inactive_user_is_rejected(account: Account) -> None:
    account.user.is_active = False
    account.user.save()
    with pytest.raises(ApiKeyRejected, match="disabled"):
        verify_api_key(account.token)


def test_last_used_is_written_at_most_once_per_interval(account: Account) -> None:
    verify_api_key(account.token)
    first = ApiKey.objects.get(pk=account.key.pk).last_used_at
    assert first is not None
    verify_api_key(account.token)
    assert ApiKey.objects.get(pk=account.key.pk).last_used_at == first
    ApiKey.objects.filter(pk=account.key.pk).update(last_used_at=first - timedelta(minutes=10))
    verify_api_key(account.token)
    refreshed = ApiKey.objects.get(pk=account.key.pk).last_used_at
    assert refreshed is not None
    assert refreshed > first - timedelta(minutes=10)


def test_invalid_token_costs_one_lookup_at_most(
    account: Account, django_assert_max_num_queries: Any
) -> None:
    with django_assert_max_num_queries(0):
        assert verify_api_key("not-a-token") is None
    with django_assert_max_num_queries(1):
        assert verify_api_key("tg_" + "b" * PREFIX_LENGTH + "_" + "c" * 43) is None


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"x-daemon-token": "  abc  "}, "abc"),
        ({"x-daemon-token": "abc", "authorization": "Bearer other"}, "abc"),
        ({"authorization": "Bearer xyz"}, "xyz"),
        ({"authorization": "bearer   xyz "}, "xyz"),
        ({"x-daemon-token": "   ", "authorization": "Bearer xyz"}, "xyz"),
        ({"authorization": "Basic xyz"}, None),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer    "}, None),
        ({}, None),
    ],
)
def test_extract_token(headers: dict[str, str], token: str | None) -> None:
    assert extract_token(headers.get) == token


def test_parse_token_rejects_wrong_shapes() -> None:
    assert parse_token("tg_short_" + "a" * 43) is None
    assert parse_token("tg_" + "A" * PREFIX_LENGTH + "_" + "a" * 43) is None
    assert parse_token("tg_" + "a" * PREFIX_LENGTH + "_" + "a" * 10) is None


def test_issue_api_key_command_prints_token_last(db: None) -> None:
    out = StringIO()
    call_command(
        "issue_api_key",
        "bob",
        "--create-user",
        "--name",
        "ci",
        "--expires-days",
        "3",
        stdout=out,
        stderr=StringIO(),
    )
    token = out.getvalue().strip().splitlines()[-1]
    caller = verify_api_key(token)
    assert caller is not None
    assert caller.user.username == "bob"
    assert caller.key_id is not None
    key = ApiKey.objects.get(pk=caller.key_id)
    assert key.name == "ci"
    assert key.expires_at is not None
    assert timedelta(days=2, hours=23) < key.expires_at - timezone.now() <= timedelta(days=3)


def test_issue_api_key_for_unknown_user_fails(db: None) -> None:
    with pytest.raises(CommandError, match="--create-user"):
        call_command("issue_api_key", "nobody", stdout=StringIO())


def test_daemon_token_endpoint_exists_only_in_debug(
    client: Any, account: Account, settings: Any
) -> None:
    settings.DEBUG = False
    client.force_login(account.user)
    assert client.get("/api/internal/daemon-token").status_code == 404


def test_daemon_token_endpoint_needs_a_session(client: Any, db: None, settings: Any) -> None:
    settings.DEBUG = True
    response = client.get("/api/internal/daemon-token")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "login_required"


def test_daemon_token_endpoint_issues_a_30_day_key(
    client: Any, account: Account, settings: Any
) -> None:
    settings.DEBUG = True
    client.force_login(account.user)
    response = client.get("/api/internal/daemon-token")
    assert response.status_code == 200
    body = response.json()
    caller = verify_api_key(body["token"])
    assert caller is not None
    assert caller.user == account.user
    assert caller.key_id is not None
    key = ApiKey.objects.get(pk=caller.key_id)
    assert key.name.startswith("daemon-token-")
    assert key.expires_at is not None
    assert key.expires_at.isoformat() == body["expires_at"]
    assert timedelta(days=29, hours=23) < key.expires_at - timezone.now() <= timedelta(days=30)
