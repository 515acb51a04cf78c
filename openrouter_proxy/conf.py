"""The proxy's settings, read lazily from Django settings.

Nothing is read at import time, so a host site may set these anywhere in its
settings module. Each is read and converted on first use, then remembered
until Django says a setting changed (``setting_changed``: ``override_settings``
and pytest-django's ``settings`` send it), which forgets them all; the proxy
reads dozens per request, and Django's settings object is slow to ask. Every
name is prefixed ``OPENROUTER_PROXY_``; ``checks.py`` validates them at start-up.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

DEFAULT_ALLOWED_MODELS = (
    "x-ai/grok-code-fast-1",
    "qwen/qwen3-coder*",
    "moonshotai/kimi-k2*",
    "z-ai/glm-4.6*",
)
DEFAULT_CORS_ALLOW_HEADERS = "authorization, content-type, x-daemon-token, x-api-key"


def remembered_until_settings_change(*instances: object) -> None:
    """Forget the remembered values of these settings objects whenever a setting changes.

    Their properties are ``functools.cached_property``: remembered in the
    instance's ``__dict__``, recomputed once forgotten. A value that fails to
    convert raises and is not remembered.
    """

    def forget(**kwargs: Any) -> None:
        for instance in instances:
            vars(instance).clear()

    names = "-".join(
        f"{type(instance).__module__}.{type(instance).__qualname__}" for instance in instances
    )
    setting_changed.connect(forget, weak=False, dispatch_uid=f"forget {names}")


class ProxySettings:
    def _get(self, name: str, default: Any) -> Any:
        return getattr(settings, f"OPENROUTER_PROXY_{name}", default)

    @cached_property
    def API_KEY(self) -> str:
        """The server's OpenRouter key; empty means "not configured" (503)."""
        return str(self._get("API_KEY", "") or "")

    @cached_property
    def BASE_URL(self) -> str:
        return str(self._get("BASE_URL", "https://openrouter.ai/api")).rstrip("/")

    @cached_property
    def KEY_VERIFIER(self) -> str:
        """The host's verifier, a dotted path; no default (``checks.py`` says if missing)."""
        return str(self._get("KEY_VERIFIER", "") or "")

    @cached_property
    def METER(self) -> str:
        """The host's meter, a dotted path (``metering.py``); empty: nothing is metered."""
        return str(self._get("METER", "") or "")

    @cached_property
    def ALLOWED_MODELS(self) -> tuple[str, ...]:
        """Glob patterns of model ids that may be requested; ``("*",)`` allows all."""
        return tuple(self._get("ALLOWED_MODELS", DEFAULT_ALLOWED_MODELS))

    @cached_property
    def ENDPOINTS(self) -> tuple[Any, ...]:
        """A host's own entries for the endpoint table (see ``endpoints.py``)."""
        return tuple(self._get("ENDPOINTS", ()))

    @cached_property
    def MAX_BODY_BYTES(self) -> int:
        return int(self._get("MAX_BODY_BYTES", 32 * 1024 * 1024))

    @cached_property
    def CONNECT_TIMEOUT(self) -> float:
        return float(self._get("CONNECT_TIMEOUT", 10.0))

    @cached_property
    def READ_TIMEOUT(self) -> float:
        """Longest wait for response headers and between two chunks of a body.

        Reasoning models can think for minutes before the first token, so the
        default is generous.
        """
        return float(self._get("READ_TIMEOUT", 300.0))

    @cached_property
    def WRITE_TIMEOUT(self) -> float:
        return float(self._get("WRITE_TIMEOUT", 60.0))

    @cached_property
    def POOL_TIMEOUT(self) -> float:
        return float(self._get("POOL_TIMEOUT", 10.0))

    @cached_property
    def TRANSPORT(self) -> str:
        """How upstream bytes move: ``"native"`` (the proxy's own HTTP/1.1 client, fastest),
        ``"aiohttp"`` (httpx's API over aiohttp's client) or ``"httpx"`` (httpx's own)."""
        return str(self._get("TRANSPORT", "native"))

    @cached_property
    def MAX_CONNECTIONS(self) -> int:
        return int(self._get("MAX_CONNECTIONS", 1000))

    @cached_property
    def CORS_MAX_AGE(self) -> int:
        return int(self._get("CORS_MAX_AGE", 86400))

    @cached_property
    def APP_URL(self) -> str:
        """Sent as ``HTTP-Referer`` for OpenRouter's app attribution, when set."""
        return str(self._get("APP_URL", "") or "")

    @cached_property
    def APP_TITLE(self) -> str:
        """Sent as ``X-OpenRouter-Title`` for OpenRouter's app attribution, when set."""
        return str(self._get("APP_TITLE", "") or "")

    @cached_property
    def SETTLE_DELAYS(self) -> tuple[float, ...]:
        """Pauses before each in-process attempt to settle a pending record.

        The generation endpoint answers 404 for a few seconds after a
        generation ends; what is still pending afterwards is left to
        ``manage.py reconcile_usage``.
        """
        return tuple(float(d) for d in self._get("SETTLE_DELAYS", (1, 2, 4, 8, 15, 30)))

    @cached_property
    def DB_THREADS(self) -> int:
        """Threads (each keeping one database connection) for the proxy's queries."""
        return int(self._get("DB_THREADS", 8))

    @cached_property
    def KEY_CACHE_SECONDS(self) -> float:
        """How long a worker remembers a verified (or refused) token; 0 disables.

        A revoked or expired key may keep working this long on a worker that
        verified it just before; in exchange most requests skip the lookup.
        On the fast path a key used again within twice this time goes on at
        once while it is verified again beside the request (see
        ``callers.verify_token``): revoked, it is refused once that lookup
        returns, so at most twice this time after the last one.
        """
        return float(self._get("KEY_CACHE_SECONDS", 10.0))

    @cached_property
    def GC_FREEZE(self) -> Any:
        """Whether a worker freezes what it has loaded at start-up (``gc.freeze``).

        The modules, classes and caches a Django site loads are tens of
        thousands of objects that never become garbage; frozen, the cycle
        collector no longer walks them on each full collection, a pause of
        50-100 ms a few times a minute under load.
        """
        return self._get("GC_FREEZE", True)

    @cached_property
    def SHUTDOWN_GRACE(self) -> float:
        """Seconds a stopping worker waits for its settlement tasks."""
        return float(self._get("SHUTDOWN_GRACE", 10.0))


proxy_settings = ProxySettings()
remembered_until_settings_change(proxy_settings)
