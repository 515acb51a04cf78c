"""This site's key verifier: tokens from the environment, users created on first use.

``HOST_SITE_TOKENS="token=username,token2=username2"``. A real site checks its own
API keys here (a database table, an identity provider...); the gateway needs only
the :class:`~openrouter_proxy.callers.Caller` back.
"""

from __future__ import annotations

import hmac
import os

from django.contrib.auth import get_user_model

from openrouter_proxy.callers import Caller


def verify_gateway_token(token: str) -> Caller | None:
    for entry in os.environ.get("HOST_SITE_TOKENS", "").split(","):
        known, _, username = entry.strip().partition("=")
        if known and username and hmac.compare_digest(known.encode(), token.encode()):
            user, _ = get_user_model().objects.get_or_create(username=username)
            return Caller(user=user, key_label=f"{username}'s token")
    return None
