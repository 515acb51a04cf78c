"""Every movement of money, each in one transaction.

The proxy calls these through ``sync_to_async``; management commands and the
admin call them directly. The rules:

* A balance changes only here, together with the ledger row that explains it,
  through ``UPDATE ... SET balance = balance ± x`` (no read-modify-write), so
  concurrent requests of one user in several processes lose nothing.
* A usage record is written once: ``request_id`` is unique (replays of the
  spool are no-ops) and so is ``generation_id`` (a generation reported twice is
  charged once).
* Overspend is bounded by admitting at most ``BILLING_MAX_IN_FLIGHT`` unsettled
  requests per user, counted in the account row itself (see ``admit_request``).
* A key's limits (spend caps, request rate) are checked in the same statement
  that takes the slot, against the key's meter row, whose spend counters move
  with the ledger row of every charge (see ``_admit_key``).

``admission`` admits requests, ``pricing`` says what they cost, ``recording``
writes their usage and charges, ``ledger`` grants credit and audits balances.
"""

from billing.services.admission import (
    MAX_REQUESTS_PER_MINUTE,
    STAMP,
    KeyLimitsLike,
    admit_request,
    release_request,
    set_key_limits,
)
from billing.services.ledger import (
    KeyMeterMismatch,
    LedgerMismatch,
    balance_of,
    check_key_meters,
    check_ledger,
    grant_credits,
)
from billing.services.pricing import Charge, bill, cost_at_price, determine_charge
from billing.services.recording import (
    Recorded,
    RecordResult,
    generation_belongs_to,
    give_up_pending,
    price_table_cost,
    record_usage,
    settle_pending,
)

__all__ = [
    "MAX_REQUESTS_PER_MINUTE",
    "STAMP",
    "Charge",
    "KeyLimitsLike",
    "KeyMeterMismatch",
    "LedgerMismatch",
    "RecordResult",
    "Recorded",
    "admit_request",
    "balance_of",
    "bill",
    "check_key_meters",
    "check_ledger",
    "cost_at_price",
    "determine_charge",
    "generation_belongs_to",
    "give_up_pending",
    "grant_credits",
    "price_table_cost",
    "record_usage",
    "release_request",
    "set_key_limits",
    "settle_pending",
]
