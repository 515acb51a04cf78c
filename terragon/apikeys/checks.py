"""System checks for the API keys' settings."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, Tags, register

from terragon.apikeys.limits import daemon_token_limits


@register(Tags.compatibility)
def check_apikey_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        daemon_token_limits()
    except ValueError as error:
        return [
            Error(
                f"Default limits of daemon tokens: {error}",
                hint="TERRAGON_DAEMON_TOKEN_SPEND_LIMIT and _DAILY_SPEND_LIMIT are US dollars "
                "(e.g. '5'), TERRAGON_DAEMON_TOKEN_RPM requests per minute; empty for none.",
                id="apikeys.E001",
            )
        ]
    return []
