"""Signals billing sends for the rest of the platform.

``credits_low`` fires once each time a balance crosses
``BILLING_CREDITS_LOW_THRESHOLD`` downwards, after the transaction that moved
it has committed: the hook for an automatic top-up. Receivers get ``user_id``,
``balance`` and ``threshold`` (both ``Decimal``).
"""

from django.dispatch import Signal

credits_low = Signal()
