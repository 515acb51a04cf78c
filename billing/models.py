"""Credit accounts, their append-only ledger, usage records and model prices.

The invariant the whole app protects: for every user,
``CreditAccount.balance == SUM(CreditLedgerEntry.amount)``. A balance changes
only in ``billing.services``, in the same transaction as the ledger row that
explains it, through an atomic ``UPDATE ... SET balance = balance + x``.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q, Sum
from django.utils import timezone

from billing.money import MoneyField, NullableMoneyField
from openrouter_proxy.metering import Outcome as RequestOutcome


class CreditAccount(models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="credit_account"
    )
    balance = MoneyField(default=Decimal(0), editable=False)
    # Requests admitted and not yet settled: the overspend bound (see services).
    in_flight = models.PositiveIntegerField(default=0, editable=False)
    in_flight_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["user_id"]
        verbose_name = "credit account"

    def __str__(self) -> str:
        return f"{self.user} (${self.balance})"


class LedgerKind(models.TextChoices):
    GRANT = "grant", "Grant"
    USAGE = "usage", "Usage charge"
    ADJUSTMENT = "adjustment", "Adjustment"
    REFUND = "refund", "Refund"


class CreditLedgerQuerySet(models.QuerySet["CreditLedgerEntry"]):
    def for_user(self, user: Any) -> CreditLedgerQuerySet:
        return self.filter(user=user)

    def total(self) -> Decimal:
        return self.aggregate(total=Sum("amount"))["total"] or Decimal(0)


class CreditLedgerEntry(models.Model):
    """One movement of a balance. Rows are never edited: corrections are new rows."""

    # Indexed by ledger_user_created, whose first column it is.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="credit_entries",
        db_index=False,
    )
    kind = models.CharField(max_length=16, choices=LedgerKind.choices)
    amount = MoneyField()
    # Idempotency: the same movement can never be written twice (ledger_reference_unique).
    reference = models.CharField(max_length=120)
    note = models.CharField(max_length=255, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="Who made the movement; empty for automatic usage charges.",
    )
    usage_record = models.OneToOneField(
        "UsageRecord",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="ledger_entry",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = CreditLedgerQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "ledger entry"
        verbose_name_plural = "ledger entries"
        indexes = [
            models.Index(fields=["user", "-created_at"], name="ledger_user_created"),
            # The admin's ledger list, newest first, and its date hierarchy.
            models.Index(fields=["-created_at", "-id"], name="ledger_created"),
        ]
        # A constraint rather than unique=True: on PostgreSQL the field would also
        # get a pattern-matching index that no query uses, written on every charge.
        constraints = [
            models.UniqueConstraint(fields=["reference"], name="ledger_reference_unique")
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.amount} for {self.user}"


class Outcome(models.TextChoices):
    """How a request ended: the proxy's outcomes (``openrouter_proxy.metering``)."""

    COMPLETED = RequestOutcome.COMPLETED.value, "Completed"
    UPSTREAM_ERROR = RequestOutcome.UPSTREAM_ERROR.value, "Upstream error"
    UPSTREAM_UNREACHABLE = RequestOutcome.UPSTREAM_UNREACHABLE.value, "Upstream unreachable"
    CLIENT_DISCONNECTED = RequestOutcome.CLIENT_DISCONNECTED.value, "Client disconnected"
    WORKER_LOST = RequestOutcome.WORKER_LOST.value, "Worker lost"


class Settlement(models.TextChoices):
    SETTLED = "settled", "Settled"
    PENDING = "pending", "Pending cost"
    UNPRICED = "unpriced", "Unpriced"


class CostSource(models.TextChoices):
    PROVIDER = "provider", "Provider-reported"
    GENERATION = "generation", "Generation stats"
    PRICE_TABLE = "price_table", "Price table"
    NONE = "none", "No cost"


class UsageRecordQuerySet(models.QuerySet["UsageRecord"]):
    def for_user(self, user: Any) -> UsageRecordQuerySet:
        return self.filter(user=user)

    def pending(self) -> UsageRecordQuerySet:
        return self.filter(settlement=Settlement.PENDING)

    def needing_attention(self) -> UsageRecordQuerySet:
        return self.filter(settlement__in=[Settlement.PENDING, Settlement.UNPRICED])

    def since(self, moment: datetime) -> UsageRecordQuerySet:
        return self.filter(created_at__gte=moment)


class UsageRecord(models.Model):
    """One proxied request to a billed endpoint. Small on purpose: no bodies."""

    request_id = models.UUIDField(unique=True, editable=False)
    # Indexed by usage_user_activity, whose first column it is.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="usage_records",
        db_index=False,
    )
    api_key_id = models.BigIntegerField(null=True, blank=True)
    api_key_label = models.CharField(max_length=40, blank=True)
    requested_model = models.CharField(max_length=200, blank=True)
    model = models.CharField(max_length=200, blank=True, help_text="Model that served it.")
    endpoint = models.CharField(max_length=40)
    streamed = models.BooleanField(default=False)
    outcome = models.CharField(max_length=24, choices=Outcome.choices)
    settlement = models.CharField(max_length=12, choices=Settlement.choices)
    cost_source = models.CharField(max_length=12, choices=CostSource.choices)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    # Unique when known (usage_generation_unique): NULL, not "", when unknown.
    generation_id = models.CharField(max_length=120, null=True, blank=True)  # noqa: DJ001
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    cached_tokens = models.PositiveIntegerField(null=True, blank=True)
    cache_write_tokens = models.PositiveIntegerField(null=True, blank=True)
    reasoning_tokens = models.PositiveIntegerField(null=True, blank=True)
    provider_cost = NullableMoneyField()
    billed = MoneyField(default=Decimal(0))
    # The record still holds one of its user's in-flight slots (pending cost).
    holds_slot = models.BooleanField(default=False, editable=False)
    upstream_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttfb_ms = models.PositiveIntegerField(null=True, blank=True)
    error_message = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    settled_at = models.DateTimeField(null=True, blank=True)

    objects = UsageRecordQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "usage record"
        # Every index is written on every request: each one here answers a query
        # no other index does (a b-tree is read backwards as well as forwards).
        indexes = [
            models.Index(fields=["model", "-created_at"], name="usage_model_created"),
            models.Index(
                fields=["settlement", "created_at"],
                name="usage_needing_attention",
                condition=~Q(settlement="settled"),
            ),
            # Covering indexes (PostgreSQL; plain indexes elsewhere) for the admin's
            # reports, answered from the index alone: per-user spend on the users'
            # page, and the last 30 days by day, model and status on the dashboard.
            models.Index(
                fields=["user", "created_at"],
                include=["billed", "outcome", "model"],
                name="usage_user_activity",
            ),
            models.Index(
                fields=["created_at"],
                include=["user", "model", "billed", "outcome", "settlement"],
                name="usage_created_rollup",
            ),
        ]
        # Constraints rather than unique=True: no pattern-matching index beside them.
        constraints = [
            models.UniqueConstraint(fields=["generation_id"], name="usage_generation_unique")
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.model or self.requested_model} ({self.request_id})"


class ModelPrice(models.Model):
    """Fallback prices (USD per token), synced from the provider's catalogue.

    Only used when a response reports tokens but no cost: the provider's own
    ``usage.cost`` is the billing truth.
    """

    model_id = models.CharField(max_length=200, unique=True)
    name = models.CharField(max_length=200, blank=True)
    prompt = MoneyField(default=Decimal(0))
    completion = MoneyField(default=Decimal(0))
    request = MoneyField(default=Decimal(0))
    image = MoneyField(default=Decimal(0))
    input_cache_read = NullableMoneyField()
    input_cache_write = NullableMoneyField()
    internal_reasoning = NullableMoneyField()
    web_search = NullableMoneyField()
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["model_id"]
        verbose_name = "model price"

    def __str__(self) -> str:
        return self.model_id


class KeyMeter(models.Model):
    """What billing knows of one API key: its spend, its limits, its recent admissions.

    Keys belong to the site (billing sees their ids as plain integers). The
    spend counters move only in ``billing.services``, in the same statement
    or transaction as the ledger row of the charge, so they equal the key's
    usage charges in the ledger: ``spent`` in total, ``spent_today`` on the
    UTC day ``spent_day``. The limits are the ones last enforced (or set by
    the site); ``rate_times`` holds the admission times of the key's last
    ``requests_per_minute`` billed requests (see ``billing.services``).
    """

    api_key_id = models.BigIntegerField(unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="key_meters"
    )
    label = models.CharField(max_length=40, blank=True)
    spent = MoneyField(default=Decimal(0), editable=False)
    spent_today = MoneyField(default=Decimal(0), editable=False)
    spent_day = models.DateField(null=True, blank=True, editable=False)
    spend_limit = NullableMoneyField()
    daily_spend_limit = NullableMoneyField()
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    # A ring of fixed-width admission times (milliseconds since the epoch) and
    # the index of the oldest, the next to be overwritten.
    rate_times = models.TextField(blank=True, default="", editable=False)
    rate_next = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["user_id", "api_key_id"]
        verbose_name = "API key meter"

    def __str__(self) -> str:
        return f"key {self.label or self.api_key_id} (${self.spent})"

    def spent_on(self, day: date) -> Decimal:
        """The key's spend on a UTC day, as far as the counter knows (today's only)."""
        return self.spent_today if self.spent_day == day else Decimal(0)


class OpenRequest(models.Model):
    """The write-ahead trace of a request admitted and not yet recorded.

    Written when the request is admitted (beside the upstream call, never in
    its way), given the generation id when the upstream answers, and deleted
    once the request's usage record is written. A row whose worker stopped
    beating is a request that worker will never record: ``recover_lost_requests``
    turns it into a usage record (pending when a generation id is known, so
    ``reconcile_usage`` settles it from generation stats; unpriced otherwise).
    """

    request_id = models.UUIDField(unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    api_key_id = models.BigIntegerField(null=True, blank=True)
    api_key_label = models.CharField(max_length=40, blank=True)
    endpoint = models.CharField(max_length=40)
    requested_model = models.CharField(max_length=200, blank=True)
    streamed = models.BooleanField(default=False)
    #: Empty until the upstream answers.
    generation_id = models.CharField(max_length=120, blank=True)
    worker = models.UUIDField(db_index=True)
    created_at = models.DateTimeField(default=timezone.now)
    answered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "open request"

    def __str__(self) -> str:
        return f"{self.endpoint} {self.request_id} (worker {self.worker})"


class WorkerHeartbeat(models.Model):
    """A serving worker process, alive while it keeps ``seen_at`` fresh."""

    worker = models.UUIDField(primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField(default=timezone.now)
    seen_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "worker heartbeat"

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"
