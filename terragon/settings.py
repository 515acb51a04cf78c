"""Settings of the Terragon site, read from the environment.

Every value has a safe default so that a fresh checkout runs with no
configuration at all: SQLite in ``var/``, the fake OpenRouter when no API key
is set (see ``manage.py serve``), and ``DEBUG`` off unless asked for.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from terragon.database_url import parse_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("TERRAGON_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def stored_secret(path: Path) -> str:
    """A random secret generated once and kept in ``path``.

    Several worker processes may start at once: the first to create the file
    wins and the others read what it wrote, so all of them agree.
    """
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = secrets.token_urlsafe(50)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(candidate)
    return candidate


DEBUG = env_bool("DJANGO_DEBUG")
# Without a configured key, one is generated into var/ on first start and kept:
# every worker process must agree on it, since API key hashes depend on it.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or stored_secret(VAR_DIR / "secret_key")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "servestatic",
    "corsheaders",
    "rest_framework",
    "terragon",
    "terragon.apikeys",
    "billing",
    "openrouter_proxy",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's CSS and JS), async, before the sync-only middleware below.
    "servestatic.middleware.ServeStaticMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "terragon.urls"
ASGI_APPLICATION = "terragon.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": parse_database_url(
        os.environ.get("DATABASE_URL") or "sqlite:///var/db.sqlite3", BASE_DIR
    ),
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# A Redis URL shares counters and caches across worker processes; without one
# each process keeps its own, which is only right for a single process.
if os.environ.get("REDIS_URL"):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["REDIS_URL"],
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# ServeStatic serves the apps' static files straight from their folders, with DEBUG on or
# off, so `uvicorn terragon.asgi:application` needs no collectstatic step (a host site
# collects them into STATIC_ROOT instead: see README).
SERVESTATIC_USE_FINDERS = True

LOGIN_URL = "/admin/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "openrouter_proxy.authentication.ApiKeyAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "UNAUTHENTICATED_USER": None,
}

# CORS for the billing API only; the proxy answers CORS itself (see README).
CORS_URLS_REGEX = r"^/api/billing/.*$"
CORS_ALLOWED_ORIGINS = env_list("BILLING_CORS_ALLOWED_ORIGINS", "")

# The gateway.
OPENROUTER_PROXY_API_KEY = os.environ.get("OPENROUTER_API_KEY", "")
OPENROUTER_PROXY_BASE_URL = os.environ.get("OPENROUTER_BASE_URL", "https://openrouter.ai/api")
if os.environ.get("OPENROUTER_TRANSPORT"):  # "native" (the default), "aiohttp" or "httpx"
    OPENROUTER_PROXY_TRANSPORT = os.environ["OPENROUTER_TRANSPORT"]
# Who a token belongs to: this site's own API keys.
OPENROUTER_PROXY_KEY_VERIFIER = "terragon.apikeys.verifier.verify_api_key"
# Who pays: billing's credits, limits and exact charges.
OPENROUTER_PROXY_METER = "billing.meter.BillingMeter"
if os.environ.get("OPENROUTER_ALLOWED_MODELS"):
    OPENROUTER_PROXY_ALLOWED_MODELS = env_list("OPENROUTER_ALLOWED_MODELS", "")
TERRAGON_API_KEY_PEPPER = os.environ.get("TERRAGON_API_KEY_PEPPER", SECRET_KEY)
# The billing admin links each user to their keys on this admin page.
BILLING_KEY_ADMIN = "apikeys.ApiKey"
BILLING_SPOOL_DIR = Path(os.environ.get("BILLING_SPOOL_DIR", VAR_DIR / "spool"))
BILLING_MARKUP = os.environ.get("BILLING_MARKUP", "1")
BILLING_MAX_IN_FLIGHT = int(os.environ.get("BILLING_MAX_IN_FLIGHT", "8"))
BILLING_PREPARED_STATEMENTS = env_bool("BILLING_PREPARED_STATEMENTS", True)
BILLING_CREDITS_LOW_THRESHOLD = os.environ.get("BILLING_CREDITS_LOW_THRESHOLD", "5")
# The window of a key's request rate (tests shorten it; keep 60 for "per minute").
BILLING_RATE_WINDOW_SECONDS = os.environ.get("BILLING_RATE_WINDOW_SECONDS", "60")
BILLING_WORKER_HEARTBEAT = float(os.environ.get("BILLING_WORKER_HEARTBEAT", "10"))
BILLING_WORKER_STALE_AFTER = float(os.environ.get("BILLING_WORKER_STALE_AFTER", "30"))
# Limits of the keys /api/internal/daemon-token issues (empty: none).
TERRAGON_DAEMON_TOKEN_SPEND_LIMIT = os.environ.get("DAEMON_TOKEN_SPEND_LIMIT", "")
TERRAGON_DAEMON_TOKEN_DAILY_SPEND_LIMIT = os.environ.get("DAEMON_TOKEN_DAILY_SPEND_LIMIT", "")
TERRAGON_DAEMON_TOKEN_RPM = os.environ.get("DAEMON_TOKEN_RPM", "")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # httpx logs every upstream request at INFO; the proxy logs its own line.
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}

# --- Operators: metrics, the API schema, the admin's reports ---------------------------------

# prometheus-client's multiprocess mode: uvicorn runs several workers and a scrape must
# add them all up. prometheus-client reads this variable when it is imported.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(VAR_DIR / "prometheus"))
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
# Who may read /metrics: these addresses (or networks), or anyone with the bearer token.
OPENROUTER_PROXY_METRICS_ALLOWED_IPS = env_list("METRICS_ALLOWED_IPS", "127.0.0.1,::1")
OPENROUTER_PROXY_METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")

INSTALLED_APPS += ["drf_spectacular"]
# (The literal above holds only lists, hence the ignore.)
REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"  # type: ignore[assignment]
SPECTACULAR_SETTINGS = {
    "TITLE": "Terragon gateway: billing API",
    "DESCRIPTION": (
        "A caller's balance, usage records and ledger. Authenticate with the same API key "
        "as the proxy, in `X-Daemon-Token` or `Authorization: Bearer`. Amounts are US "
        "dollars as decimal strings."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # The key authentication is described once, here, for every operation.
    "AUTHENTICATION_WHITELIST": [],
    "APPEND_COMPONENTS": {
        "securitySchemes": {
            "daemonToken": {"type": "apiKey", "in": "header", "name": "X-Daemon-Token"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
    },
    "SECURITY": [{"daemonToken": []}, {"bearer": []}],
}

# The billing admin's reports are short queries over many rows; PostgreSQL's planner
# rates them expensive and would spend longer JIT-compiling them than running them.
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["OPTIONS"].setdefault("options", "-c jit=off")
