"""OpenAI-style JSON errors, the only error format the proxy speaks.

Clients (the OpenAI SDKs, opencode) parse ``{"error": {"message", "type",
"code"}}``; a browser client can read it because every error carries the same
CORS headers as a success.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.http import HttpResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_payload(
    status: int, message: str, code: str, error_type: str | None = None
) -> dict[str, Any]:
    """The error envelope, ``{"error": {"message", "type", "code"}}``, as a dict.

    The one place it is built: the proxy's responses, the billing API and the
    host's JSON views all answer with it. ``type`` follows the status unless given.
    """
    return {
        "error": {
            "message": message,
            "type": error_type or ERROR_TYPES.get(status, "api_error"),
            "code": code,
        }
    }


def error_body(status: int, message: str, code: str, error_type: str | None = None) -> bytes:
    return json.dumps(error_payload(status, message, code, error_type)).encode()


def error_response(
    status: int,
    message: str,
    code: str,
    *,
    headers: Mapping[str, str] | None = None,
    error_type: str | None = None,
    retry: bool | None = None,
) -> HttpResponse:
    """An error response; ``retry=False`` tells SDKs a retry would spend twice."""
    response = HttpResponse(
        error_body(status, message, code, error_type),
        status=status,
        content_type="application/json",
    )
    for name, value in (headers or {}).items():
        response[name] = value
    if retry is not None:
        response["x-should-retry"] = "true" if retry else "false"
    return response


@dataclass(frozen=True, slots=True)
class Refusal:
    """One way the gateway refuses a request: its status, code and message."""

    status: int
    code: str
    message: str
    #: Tells the OpenAI SDKs whether a retry can help (``x-should-retry``).
    retry: bool | None = None

    def text(self, **details: Any) -> str:
        """The message, its ``{placeholders}`` filled with ``details``."""
        return self.message.format(**details) if details else self.message

    def payload(self, **details: Any) -> dict[str, Any]:
        """The error envelope as a dict, for a framework that serializes it (DRF, JsonResponse)."""
        return error_payload(self.status, self.text(**details), self.code)

    def response(self, headers: Mapping[str, str] | None = None, **details: Any) -> HttpResponse:
        return error_response(
            self.status, self.text(**details), self.code, headers=headers, retry=self.retry
        )


# Every refusal of the proxy, in one table. Messages with ``{placeholders}``
# are formatted with the details the refusing code passes.
MISSING_API_KEY = Refusal(
    401,
    "missing_api_key",
    "Missing API key: send it as `X-Daemon-Token`, `Authorization: Bearer` or `x-api-key`.",
)
INVALID_API_KEY = Refusal(401, "invalid_api_key", "Invalid API key.")
NOT_CONFIGURED = Refusal(503, "not_configured", "The gateway has no OpenRouter API key configured.")
DB_DOWN = Refusal(
    503, "db_down", "The gateway's database is unavailable; try again shortly.", retry=True
)
BODY_TOO_LARGE = Refusal(413, "body_too_large", "The request body is larger than {limit} bytes.")
INVALID_PATH = Refusal(400, "invalid_path", "This path cannot be proxied ({reason}).")
ENDPOINT_NOT_AVAILABLE = Refusal(
    404, "endpoint_not_available", "`{path}` is not available through this gateway."
)
METHOD_NOT_ALLOWED = Refusal(
    405, "method_not_allowed", "`{method}` is not allowed on `{path}` through this gateway."
)
GENERATION_NOT_FOUND = Refusal(404, "generation_not_found", "No generation of yours has this id.")
MISSING_GENERATION_ID = Refusal(
    400, "invalid_generation_id", "Ask for exactly one generation: `?id=<generation id>`."
)
INSUFFICIENT_CREDITS = Refusal(
    402, "insufficient_credits", "You have no credit left. Top up to continue."
)
TOO_MANY_IN_FLIGHT = Refusal(
    429,
    "too_many_in_flight",
    "Too many requests in flight for this account; retry when one finishes.",
)
KEY_SPEND_LIMIT = Refusal(
    402,
    "key_spend_limit",
    "This API key has reached its spend limit. The account's other keys are not affected.",
)
KEY_DAILY_SPEND_LIMIT = Refusal(
    402,
    "key_daily_spend_limit",
    "This API key has reached its daily spend limit; it resets at 00:00 UTC.",
)
RATE_LIMITED = Refusal(
    429, "rate_limited", "This API key is over its rate limit; retry in {retry_after} s."
)
