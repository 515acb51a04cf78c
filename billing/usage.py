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

    @property
    def has_tokens(self) -> bool:
        return bool(self.prompt_tokens or self.completion_tokens)

    @property
    def provider_cost(self) -> Decimal | None:
        """The amount the provider charged for this generation, if it said.

        With BYOK the provider's own fee is ``cost`` (usually zero) and the
        inference was paid upstream, reported as ``upstream_inference_cost``.
        """
        if self.is_byok and self.upstream_inference_cost is not None:
            return self.upstream_inference_cost
        return self.cost
