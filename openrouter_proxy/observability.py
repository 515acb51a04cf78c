"""Where the proxy reports what operators watch: metrics per request.

The view calls these hooks at fixed points; they must be cheap and must never
raise into the request path.
"""

from __future__ import annotations

from billing.services import Recorded, UsageDraft


def request_refused(status: int, code: str) -> None:
    """A request answered by the gateway itself with an error (401, 402, 429...)."""


def billed_request_started() -> None:
    """A billed request was admitted and is about to go upstream."""


def billed_request_finished(draft: UsageDraft, recorded: Recorded | None) -> None:
    """A billed request ended and its usage was recorded (``None``: spooled)."""


def pending_settled(settled: bool) -> None:
    """An in-process settlement attempt for a pending record ended."""
