"""The site's default key verifier for the proxy and the billing API.

One indexed lookup by prefix, then a constant-time comparison of the secret's
HMAC. When no row has that prefix the HMAC is still computed and compared, so
a probe cannot tell a wrong prefix from a wrong secret by timing.
"""

from __future__ import annotations

import hmac
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from openrouter_proxy.callers import ApiKeyRejected, Caller
from terragon.apikeys.models import ApiKey
from terragon.apikeys.tokens import hash_secret, parse_token

# Compared against when no key has the presented prefix.
_NO_KEY_HASH = "0" * 64


def last_used_interval() -> timedelta:
    return timedelta(seconds=getattr(settings, "TERRAGON_API_KEY_LAST_USED_INTERVAL", 300))


def verify_api_key(token: str) -> Caller | None:
    parsed = parse_token(token)
    if parsed is None:
        return None
    key = (
        ApiKey.objects.select_related("user")
        .only(
            "id",
            "prefix",
            "secret_hash",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "spend_limit",
            "daily_spend_limit",
            "requests_per_minute",
            "user__id",
            "user__username",
            "user__is_active",
        )
        .filter(prefix=parsed.prefix)
        .first()
    )
    presented = hash_secret(parsed.secret)
    if not hmac.compare_digest(presented, key.secret_hash if key else _NO_KEY_HASH) or not key:
        return None
    now = timezone.now()
    if key.revoked_at is not None:
        raise ApiKeyRejected("This API key has been revoked.")
    if key.is_expired(now):
        raise ApiKeyRejected("This API key has expired.")
    if not key.user.is_active:
        raise ApiKeyRejected("The account of this API key is disabled.")
    # Record use at most once per interval: a write per request would turn
    # every proxied call into a row update on a hot row.
    if key.last_used_at is None or now - key.last_used_at >= last_used_interval():
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    limits = key.limits
    return Caller(user=key.user, key_id=key.pk, key_label=f"tg_{key.prefix}", limits=limits or None)
