"""Billing's settings, read lazily from Django settings (prefix ``BILLING_``).

Each is read on first use and remembered until a setting changes, as the
proxy's are (``openrouter_proxy.conf``).
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any

from django.conf import settings

from openrouter_proxy.conf import remembered_until_settings_change


class BillingSettings:
    def _get(self, name: str, default: Any) -> Any:
        return getattr(settings, f"BILLING_{name}", default)

    @cached_property
    def MARKUP(self) -> Decimal:
        """Billed amount = provider cost * MARKUP."""
        return Decimal(str(self._get("MARKUP", "1")))

    @cached_property
    def MAX_IN_FLIGHT(self) -> int:
        """Requests one user may have in flight at once (the overspend bound)."""
        return int(self._get("MAX_IN_FLIGHT", 8))

    @cached_property
    def ADMISSION_CONNECTIONS(self) -> int:
        """Database connections per serving event loop for admissions and records on the loop.

        On PostgreSQL the proxy's fast path admits requests without key limits,
        and a worker that is not busy records a lone request, over psycopg's
        asynchronous connections (see ``billing.services.admission_async`` and
        ``billing.services.recording_async``), at most this many at once.
        """
        return int(self._get("ADMISSION_CONNECTIONS", 8))

    @cached_property
    def PREPARED_STATEMENTS(self) -> bool:
        """Whether the statements of every request are prepared on PostgreSQL.

        Off only behind a connection pooler that does not keep prepared
        statements (PgBouncer in transaction mode before 1.21); see
        ``billing.services._sql.hot_cursor``.
        """
        return self._get("PREPARED_STATEMENTS", True)  # type: ignore[no-any-return]

    @cached_property
    def IN_FLIGHT_LEASE(self) -> int:
        """Seconds after which an idle user's in-flight count is presumed stale.

        Slots held by a worker that died are given back when the user has
        started no request for this long.
        """
        return int(self._get("IN_FLIGHT_LEASE", 1800))

    @cached_property
    def WORKER_HEARTBEAT(self) -> float:
        """Seconds between two heartbeats of a serving worker."""
        return float(self._get("WORKER_HEARTBEAT", 10))

    @cached_property
    def WORKER_STALE_AFTER(self) -> float:
        """Seconds without a heartbeat after which a worker is presumed dead.

        Its open requests are then recovered (and the slots they held come
        back as they settle), so a crashed worker's users wait about this
        long, not ``IN_FLIGHT_LEASE``.
        """
        return float(self._get("WORKER_STALE_AFTER", 30))

    @cached_property
    def RATE_WINDOW_SECONDS(self) -> int:
        """The window of a key's request rate: at most N admitted in any such window.

        60 for "requests per minute"; tests shorten it to run in seconds.
        """
        return int(self._get("RATE_WINDOW_SECONDS", 60))

    @cached_property
    def CREDITS_LOW_THRESHOLD(self) -> Decimal:
        return Decimal(str(self._get("CREDITS_LOW_THRESHOLD", "5")))

    @cached_property
    def SPOOL_DIR(self) -> Path:
        """Where charges that could not reach the database wait to be replayed."""
        return Path(self._get("SPOOL_DIR", Path(settings.BASE_DIR) / "var" / "spool"))

    @cached_property
    def RECORD_ATTEMPTS(self) -> int:
        return int(self._get("RECORD_ATTEMPTS", 3))

    @cached_property
    def RECORD_RETRY_DELAY(self) -> float:
        return float(self._get("RECORD_RETRY_DELAY", 0.2))

    @cached_property
    def KEY_ADMIN(self) -> str:
        """The host's API key model (``"app_label.Model"``) the admin links to; empty: none."""
        return str(self._get("KEY_ADMIN", "") or "")


billing_settings = BillingSettings()
remembered_until_settings_change(billing_settings)
