"""What a request costs and what its user pays: pure functions, no database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from billing.conf import billing_settings
from billing.models import CostSource, ModelPrice, Outcome, Settlement
from billing.money import quantize
from openrouter_proxy.metering import ReportedUsage, UsageDraft


@dataclass(frozen=True, slots=True)
class Charge:
    settlement: str
    cost_source: str
    provider_cost: Decimal | None
    billed: Decimal


def bill(cost: Decimal) -> Decimal:
    """What the user pays for a provider cost."""
    return quantize(cost * billing_settings.MARKUP)


def cost_at_price(usage: ReportedUsage, price: ModelPrice) -> Decimal:
    """Cost of the usage's tokens at one catalogue price."""
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    cached = min(usage.cached_tokens or 0, prompt)
    cache_write = min(usage.cache_write_tokens or 0, prompt - cached)
    reasoning = min(usage.reasoning_tokens or 0, completion)
    cache_read_price = price.prompt if price.input_cache_read is None else price.input_cache_read
    cache_write_price = price.prompt if price.input_cache_write is None else price.input_cache_write
    cost = (prompt - cached - cache_write) * price.prompt
    cost += cached * cache_read_price + cache_write * cache_write_price
    if price.internal_reasoning is not None and reasoning:
        cost += reasoning * price.internal_reasoning + (completion - reasoning) * price.completion
    else:
        cost += completion * price.completion
    return cost + price.request


def determine_charge(
    draft: UsageDraft, price_table: Callable[[ReportedUsage, str], Decimal | None]
) -> Charge:
    """How a request is billed, from the best source available.

    The provider's reported cost is the truth, an explicit zero included.
    Without it: the price table for reported tokens; the generation stats
    endpoint when a generation id is known (the record stays pending); else
    the record is unpriced, for an operator to see. Never a silent zero.

    ``price_table`` gives the cost of the usage at a model's catalogue price
    (``None`` without one); it is asked only for reported tokens.
    """
    usage = draft.usage
    cost = usage.provider_cost
    if cost is not None:
        return Charge(Settlement.SETTLED, CostSource.PROVIDER, cost, bill(cost))
    if usage.cost_from_stats and usage.generation_id:
        return Charge(Settlement.PENDING, CostSource.NONE, None, Decimal(0))
    if usage.has_tokens:
        estimated = price_table(usage, usage.model or draft.requested_model)
        if estimated is not None:
            return Charge(Settlement.SETTLED, CostSource.PRICE_TABLE, estimated, bill(estimated))
    if usage.generation_id:
        return Charge(Settlement.PENDING, CostSource.NONE, None, Decimal(0))
    if (
        usage.has_tokens
        or draft.cost_unknown
        or draft.outcome in (Outcome.COMPLETED, Outcome.CLIENT_DISCONNECTED)
    ):
        return Charge(Settlement.UNPRICED, CostSource.NONE, None, Decimal(0))
    # Refused or failed before anything was generated: nothing to pay.
    return Charge(Settlement.SETTLED, CostSource.NONE, None, Decimal(0))
