"""``GET /api/internal/daemon-token``: a fresh key for local testing.

Exists only with ``DEBUG`` on (404 otherwise), for a logged-in user (401 JSON
otherwise), like the original route's development helper. The key gets the limits of the
``TERRAGON_DAEMON_TOKEN_*`` settings (none by default).
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from billing.money import format_usd
from openrouter_proxy.errors import Refusal
from terragon.apikeys.limits import daemon_token_limits
from terragon.apikeys.models import ApiKey

DAEMON_TOKEN_LIFETIME = timedelta(days=30)
LOGIN_REQUIRED = Refusal(401, "login_required", "Log in first (e.g. at /admin/login/).")


@require_GET
def daemon_token(request: HttpRequest) -> JsonResponse:
    if not settings.DEBUG:
        raise Http404
    if not request.user.is_authenticated:
        return JsonResponse(LOGIN_REQUIRED.payload(), status=LOGIN_REQUIRED.status)
    key, token = ApiKey.objects.issue(
        request.user,
        name=f"daemon-token-{secrets.token_hex(4)}",
        expires_in=DAEMON_TOKEN_LIFETIME,
        limits=daemon_token_limits(),
    )
    assert key.expires_at is not None
    return JsonResponse(
        {
            "token": token,
            "expires_at": key.expires_at.isoformat(),
            "limits": {
                "spend_limit": _usd(key.spend_limit),
                "daily_spend_limit": _usd(key.daily_spend_limit),
                "requests_per_minute": key.requests_per_minute,
            },
        }
    )


def _usd(amount: Decimal | None) -> str | None:
    return None if amount is None else format_usd(amount)
