"""The platform's API keys: what daemons present as ``X-Daemon-Token``."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from billing.money import NullableMoneyField
from billing.services import MAX_REQUESTS_PER_MINUTE, set_key_limits
from openrouter_proxy.callers import KeyLimits
from terragon.apikeys.tokens import generate_token, hash_secret

LIMIT_FIELDS = ("spend_limit", "daily_spend_limit", "requests_per_minute")


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def usable(self, now: datetime | None = None) -> ApiKeyQuerySet:
        now = now or timezone.now()
        return self.filter(revoked_at__isnull=True).exclude(expires_at__lte=now)

    def for_user(self, user: Any) -> ApiKeyQuerySet:
        return self.filter(user=user)


class ApiKeyManager(models.Manager["ApiKey"]):
    def get_queryset(self) -> ApiKeyQuerySet:
        return ApiKeyQuerySet(self.model, using=self._db)

    def usable(self, now: datetime | None = None) -> ApiKeyQuerySet:
        return self.get_queryset().usable(now)

    def issue(
        self,
        user: Any,
        name: str,
        expires_in: timedelta | None = None,
        limits: KeyLimits | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key and return it with its token, the only time the token exists."""
        token, parts = generate_token()
        limits = limits or KeyLimits()
        key = self.create(
            user=user,
            name=name,
            prefix=parts.prefix,
            secret_hash=hash_secret(parts.secret),
            expires_at=timezone.now() + expires_in if expires_in else None,
            spend_limit=limits.spend_limit,
            daily_spend_limit=limits.daily_spend_limit,
            requests_per_minute=limits.requests_per_minute,
        )
        return key, token


class ApiKey(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The key's own limits, each optional; the user's credit applies as well.
    spend_limit = NullableMoneyField(
        validators=[MinValueValidator(Decimal(0))],
        help_text="US dollars this key may spend in total; empty for no cap.",
    )
    daily_spend_limit = NullableMoneyField(
        validators=[MinValueValidator(Decimal(0))],
        help_text="US dollars this key may spend per day (UTC); empty for no cap.",
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_REQUESTS_PER_MINUTE)],
        help_text="Billed requests this key may start in any 60 seconds; empty for no limit.",
    )

    objects = ApiKeyManager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"
        verbose_name_plural = "API keys"
        constraints = [
            models.CheckConstraint(
                condition=Q(spend_limit__isnull=True) | Q(spend_limit__gte=0),
                name="apikey_spend_limit_not_negative",
            ),
            models.CheckConstraint(
                condition=Q(daily_spend_limit__isnull=True) | Q(daily_spend_limit__gte=0),
                name="apikey_daily_spend_limit_not_negative",
            ),
            models.CheckConstraint(
                condition=Q(requests_per_minute__isnull=True)
                | Q(requests_per_minute__gte=1, requests_per_minute__lte=MAX_REQUESTS_PER_MINUTE),
                name="apikey_requests_per_minute_in_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} (tg_{self.prefix}_…)"

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save, and tell billing the key's limits (its meter shows them at once)."""
        fields = kwargs.get("update_fields")
        with transaction.atomic():
            super().save(*args, **kwargs)
            if fields is None or set(fields) & set(LIMIT_FIELDS):
                set_key_limits(self.pk, self.user_id, self.limits, label=f"tg_{self.prefix}")

    @property
    def limits(self) -> KeyLimits:
        """The key's limits as the proxy enforces them (falsy when there are none)."""
        return KeyLimits(
            spend_limit=self.spend_limit,
            daily_spend_limit=self.daily_spend_limit,
            requests_per_minute=self.requests_per_minute,
        )

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @property
    def state(self) -> str:
        if self.is_revoked:
            return "revoked"
        if self.is_expired():
            return "expired"
        return "active"

    def revoke(self) -> bool:
        """Revoke the key for good. Returns False if it was revoked already."""
        now = timezone.now()
        changed = ApiKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=now)
        if changed:
            self.revoked_at = now
        return bool(changed)
