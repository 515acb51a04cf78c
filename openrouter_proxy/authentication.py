"""DRF authentication with the proxy's key verifier.

REST endpoints beside the proxy (the billing API) accept exactly the
credentials the proxy accepts: ``X-Daemon-Token`` or ``Authorization:
Bearer``, checked by the same pluggable verifier, and refuse a bad one with the
proxy's ``invalid_api_key`` message and code.
"""

from __future__ import annotations

import inspect
from typing import Any

from asgiref.sync import async_to_sync
from django.utils.module_loading import import_string
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from openrouter_proxy.callers import ApiKeyRejected, Caller, extract_token
from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.errors import INVALID_API_KEY


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, Caller] | None:
        token = extract_token(lambda name: request.headers.get(name))
        if token is None:
            return None
        verifier = import_string(proxy_settings.KEY_VERIFIER)
        try:
            if inspect.iscoroutinefunction(verifier):
                caller = async_to_sync(verifier)(token)
            else:
                caller = verifier(token)
        except ApiKeyRejected as rejected:
            raise exceptions.AuthenticationFailed(str(rejected), INVALID_API_KEY.code) from rejected
        if caller is None:
            raise exceptions.AuthenticationFailed(INVALID_API_KEY.message, INVALID_API_KEY.code)
        return caller.user, caller

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
