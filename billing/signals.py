"""Signals billing sends for the rest of the platform.

``credits_low`` fires once each time a balance crosses
``BILLING_CREDITS_LOW_THRESHOLD`` downwards, after the transaction that moved
it has committed: the hook for an automatic top-up. Receivers get ``user_id``,
``balance`` and ``threshold`` (both ``Decimal``).

``key_limit_reached`` fires once each time a charge brings an API key's spend
to or past one of its caps, after the transaction that charged it has
committed: the hook to tell the key's owner that a sandbox stopped. Receivers
get ``api_key_id``, ``user_id``, ``limit`` (``"spend_limit"`` or
``"daily_spend_limit"``), ``spent`` (the key's spend in total, or on the UTC
day ``day``) and ``cap`` (both ``Decimal``), and ``day`` (a ``date``). Requests
refused for the key's rate are counted in the metrics, not signalled.
"""

from django.dispatch import Signal

credits_low = Signal()
key_limit_reached = Signal()
