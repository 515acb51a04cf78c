"""ASGI entry point: ``uvicorn terragon.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "terragon.settings")

site_application = get_asgi_application()

from openrouter_proxy.asgi import with_proxy_fast_path  # noqa: E402  (needs Django set up)

# The prefix is where terragon/urls.py includes openrouter_proxy.urls.
application = with_proxy_fast_path(site_application)
