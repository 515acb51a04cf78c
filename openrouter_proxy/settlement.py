"""Settling records whose cost the response did not carry.

When a client goes away mid-stream the proxy closes the upstream request at
once (nobody should pay for tokens nobody reads), so the final usage chunk
never arrives. OpenRouter still knows what the generation cost: its
``/v1/generation?id=`` endpoint answers with ``total_cost`` (and, for BYOK,
``upstream_inference_cost``) once the generation is indexed (404 for a few
seconds before). The proxy asks it in a
background task with growing pauses; whatever is still pending after that is
settled by ``manage.py reconcile_usage``.

Background tasks are tracked so a stopping worker can wait for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Coroutine
from decimal import Decimal
from typing import Any

import httpx

from openrouter_proxy import observability
from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.db import run_db
from openrouter_proxy.metering import GenerationCost, Meter, byok_total
from openrouter_proxy.upstream import get_client

logger = logging.getLogger(__name__)

_background: set[asyncio.Task[Any]] = set()


def run_in_background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Start a task the worker waits for at shutdown (see :func:`drain`)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def pending_tasks() -> int:
    return len(_background)


async def drain(grace: float) -> None:
    """Wait up to ``grace`` seconds for background tasks of this loop."""
    loop = asyncio.get_running_loop()
    mine = [task for task in _background if task.get_loop() is loop]
    if not mine:
        return
    _, still_running = await asyncio.wait(mine, timeout=grace)
    for task in still_running:
        task.cancel()
    if still_running:
        logger.warning(
            "%d settlement task(s) cut short by shutdown; reconcile_usage will finish them",
            len(still_running),
        )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _money(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or value < 0:
        return None
    return Decimal(value)


def parse_generation(body: bytes) -> GenerationCost | None:
    """The cost in a ``/v1/generation`` answer, or None if it does not say it.

    The rule is the one of :attr:`openrouter_proxy.metering.ReportedUsage.provider_cost`:
    ``total_cost`` is what OpenRouter charged; for a BYOK generation
    (``is_byok: true``) that is only OpenRouter's fee, and the provider's
    price, ``upstream_inference_cost``, is added. Without BYOK
    ``upstream_inference_cost`` is ignored (it is 0 or null there).
    """
    try:
        payload = json.loads(body, parse_float=Decimal)
    except ValueError:
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        return None
    cost = _money(data.get("total_cost"))
    if data.get("is_byok") is True:
        cost = byok_total(cost, _money(data.get("upstream_inference_cost")))
    if cost is None:
        return None
    return GenerationCost(
        cost=cost,
        prompt_tokens=_count(data.get("native_tokens_prompt", data.get("tokens_prompt"))),
        completion_tokens=_count(
            data.get("native_tokens_completion", data.get("tokens_completion"))
        ),
        reasoning_tokens=_count(data.get("native_tokens_reasoning")),
        cached_tokens=_count(data.get("native_tokens_cached")),
    )


def generation_request(generation_id: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL, query parameters and headers of a generation-stats request."""
    return (
        f"{proxy_settings.BASE_URL}/v1/generation",
        {"id": generation_id},
        {"authorization": f"Bearer {proxy_settings.API_KEY}"},
    )


async def fetch_generation_cost(generation_id: str) -> GenerationCost | None:
    url, params, headers = generation_request(generation_id)
    response = await get_client().get(url, params=params, headers=headers)
    if response.status_code != 200:
        return None
    return parse_generation(response.content)


async def settle_from_generation(meter: Meter, request_id: uuid.UUID, generation_id: str) -> bool:
    """Try, with pauses, to have the meter settle one pending record in this process."""
    for delay in proxy_settings.SETTLE_DELAYS:
        await asyncio.sleep(delay)
        try:
            stats = await fetch_generation_cost(generation_id)
        except httpx.HTTPError as error:
            logger.info("generation %s not fetched yet: %s", generation_id, error)
            continue
        if stats is None:
            continue
        try:
            settled = await run_db(meter.settle, request_id, stats)
            observability.pending_settled(settled)
            return settled
        except Exception:
            logger.exception(
                "settling generation %s failed; reconcile_usage will retry", generation_id
            )
            return False
    logger.info("generation %s still unpriced in-process; left to reconcile_usage", generation_id)
    return False
