"""DRF authentication with the proxy's key verifier.

REST endpoints beside the proxy (the billing API) accept exactly the
credentials the proxy accepts: ``X-Daemon-Token`` or ``Authorization:
Bearer``, checked by the same pluggable verifier.
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
            raise exceptions.AuthenticationFailed(str(rejected)) from rejected
        if caller is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        return caller.user, caller

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
