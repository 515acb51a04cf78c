"""OpenAI-style JSON errors, the only error format the proxy speaks.

Clients (the OpenAI SDKs, opencode) parse ``{"error": {"message", "type",
"code"}}``; a browser client can read it because every error carries the same
CORS headers as a success.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from django.http import HttpResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str, error_type: str | None = None) -> bytes:
    payload = {
        "error": {
            "message": message,
            "type": error_type or ERROR_TYPES.get(status, "api_error"),
            "code": code,
        }
    }
    return json.dumps(payload).encode()


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
