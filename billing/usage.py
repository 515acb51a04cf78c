"""What an upstream said about one generation, in billing's own terms.

The proxy parses the provider's wire format; billing only ever sees this
small, immutable value. Every amount is a ``Decimal`` parsed straight from the
provider's JSON text, and every field is ``None`` when the provider did not say
it: billing must be able to tell "free" (an explicit ``0``) from "unknown".
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class ReportedUsage:
    """Usage and cost of one generation as reported by the provider."""

    generation_id: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost: Decimal | None = None
    upstream_inference_cost: Decimal | None = None
    is_byok: bool = False
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    #: The response's shape never carries the cost (an Anthropic stream, audio
    #: bytes): the generation stats are the source to wait for, before any
    #: price-table estimate from the tokens it did report.
    cost_from_stats: bool = False

    @property
    def has_tokens(self) -> bool:
        return bool(self.prompt_tokens or self.completion_tokens)

    @property
    def provider_cost(self) -> Decimal | None:
        """What the operator paid for this generation in total, if the provider said.

        Without BYOK that is ``cost``, what OpenRouter charged (its
        ``upstream_inference_cost`` is then only a breakdown of the same money).
        With BYOK it is two bills: OpenRouter's own fee, ``cost``, taken from
        the OpenRouter credits, plus the provider's price for the inference,
        ``upstream_inference_cost``, paid on the operator's provider key. Both
        must be known: with either missing the total is unknown, not the half
        that was reported.
        """
        if not self.is_byok:
            return self.cost
        return byok_total(self.cost, self.upstream_inference_cost)


def byok_total(fee: Decimal | None, upstream_inference_cost: Decimal | None) -> Decimal | None:
    """A BYOK generation's whole price: OpenRouter's fee plus the provider's price."""
    if fee is None or upstream_inference_cost is None:
        return None
    return fee + upstream_inference_cost
