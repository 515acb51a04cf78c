"""The platform's API keys: what daemons present as ``X-Daemon-Token``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from terragon.apikeys.tokens import generate_token, hash_secret


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
    ) -> tuple[ApiKey, str]:
        """Create a key and return it with its token, the only time the token exists."""
        token, parts = generate_token()
        key = self.create(
            user=user,
            name=name,
            prefix=parts.prefix,
            secret_hash=hash_secret(parts.secret),
            expires_at=timezone.now() + expires_in if expires_in else None,
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

    objects = ApiKeyManager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"
        verbose_name_plural = "API keys"

    def __str__(self) -> str:
        return f"{self.name} (tg_{self.prefix}_…)"

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
