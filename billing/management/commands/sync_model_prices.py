"""``manage.py sync_model_prices``: fill the fallback price table from ``/v1/models``."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from billing.models import ModelPrice
from openrouter_proxy.conf import proxy_settings

PRICE_FIELDS = {
    "prompt": "prompt",
    "completion": "completion",
    "request": "request",
    "image": "image",
    "input_cache_read": "input_cache_read",
    "input_cache_write": "input_cache_write",
    "internal_reasoning": "internal_reasoning",
    "web_search": "web_search",
}
REQUIRED = {"prompt", "completion", "request", "image"}


def parse_price(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        return None
    return price if price.is_finite() and price >= 0 else None


def sync_prices(catalogue: dict[str, Any]) -> tuple[int, int]:
    """Upsert prices from a ``/v1/models`` payload; returns (written, skipped)."""
    written = skipped = 0
    models = catalogue.get("data")
    if not isinstance(models, list):
        raise ValueError("the catalogue has no `data` list")
    now = timezone.now()
    with transaction.atomic():
        for entry in models:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                skipped += 1
                continue
            raw_pricing = entry.get("pricing")
            pricing: dict[str, Any] = raw_pricing if isinstance(raw_pricing, dict) else {}
            values: dict[str, Any] = {"name": str(entry.get("name", ""))[:200], "updated_at": now}
            for source, field in PRICE_FIELDS.items():
                price = parse_price(pricing.get(source))
                values[field] = price if price is not None or field not in REQUIRED else Decimal(0)
            if parse_price(pricing.get("prompt")) is None:
                skipped += 1
                continue
            ModelPrice.objects.update_or_create(model_id=entry["id"][:200], defaults=values)
            written += 1
    return written, skipped


class Command(BaseCommand):
    help = "Fetch OpenRouter's model catalogue and update the fallback price table."

    def handle(self, *args: Any, **options: Any) -> None:
        url = f"{proxy_settings.BASE_URL}/v1/models"
        headers = {}
        if proxy_settings.API_KEY:
            headers["authorization"] = f"Bearer {proxy_settings.API_KEY}"
        self.stderr.write(f"fetching {url} …")
        try:
            response = httpx.get(url, headers=headers, timeout=30, trust_env=False)
            response.raise_for_status()
            catalogue = json.loads(response.content)
            written, skipped = sync_prices(catalogue)
        except (httpx.HTTPError, ValueError) as error:
            raise CommandError(f"could not sync prices: {error}") from error
        self.stdout.write(
            f"sync_model_prices: {written} model price(s) written, {skipped} skipped."
        )
