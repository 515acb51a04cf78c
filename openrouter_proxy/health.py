"""``GET /healthz``: is this worker fit to take traffic? For load balancers, without a key.

200 when the database answers and the server's OpenRouter key is configured,
503 otherwise, with a small JSON body saying which. OpenRouter itself is not
called: a health probe every few seconds must cost nothing upstream, and an
upstream outage is reported to each request (502/504), not by taking every
worker out of the pool at once.
"""

from __future__ import annotations

import asyncio
import logging

from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.db import run_db

logger = logging.getLogger(__name__)

# A database that does not answer in this long counts as unreachable.
DATABASE_TIMEOUT = 5.0


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _database_ok() -> bool:
    try:
        await asyncio.wait_for(run_db(_ping_database), DATABASE_TIMEOUT)
    except (DatabaseError, TimeoutError) as error:
        logger.warning("health check: the database is unreachable: %s", error)
        return False
    return True


@require_safe
async def healthz(request: HttpRequest) -> JsonResponse:
    database = await _database_ok()
    upstream_key = bool(proxy_settings.API_KEY)
    healthy = database and upstream_key
    response = JsonResponse(
        {
            "status": "ok" if healthy else "unavailable",
            "database": "ok" if database else "unreachable",
            "upstream_key": "configured" if upstream_key else "missing",
        },
        status=200 if healthy else 503,
    )
    response["Cache-Control"] = "no-store"
    return response
