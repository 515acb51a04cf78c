"""``manage.py issue_api_key USERNAME``: print a new token as the last line.

``--spend-limit USD``, ``--daily-spend-limit USD`` and ``--rpm N`` set the
key's own limits (see the README's "Limits per key").
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from openrouter_proxy.callers import KeyLimits
from terragon.apikeys.limits import parse_rate, parse_usd
from terragon.apikeys.models import ApiKey


def describe(limits: KeyLimits) -> str:
    parts = []
    if limits.spend_limit is not None:
        parts.append(f"${limits.spend_limit.normalize():f} in total")
    if limits.daily_spend_limit is not None:
        parts.append(f"${limits.daily_spend_limit.normalize():f} a day")
    if limits.requests_per_minute is not None:
        parts.append(f"{limits.requests_per_minute} requests a minute")
    return ", ".join(parts) or "none"


class Command(BaseCommand):
    help = "Issue an API key for a user and print its token (shown only once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--create-user", action="store_true", help="Create the user if absent.")
        parser.add_argument("--name", default="cli", help="A name to recognise the key by.")
        parser.add_argument("--expires-days", type=int, default=None, help="Lifetime in days.")
        parser.add_argument(
            "--spend-limit", metavar="USD", help="Cap on the key's spend in total (US dollars)."
        )
        parser.add_argument(
            "--daily-spend-limit",
            metavar="USD",
            help="Cap on the key's spend per UTC day (US dollars).",
        )
        parser.add_argument(
            "--rpm", metavar="N", help="Billed requests the key may start in any 60 seconds."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        username = options["username"]
        days = options["expires_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-days must be positive.")
        try:
            limits = KeyLimits(
                spend_limit=parse_usd(options["spend_limit"], "--spend-limit"),
                daily_spend_limit=parse_usd(options["daily_spend_limit"], "--daily-spend-limit"),
                requests_per_minute=parse_rate(options["rpm"], "--rpm"),
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        try:
            user = user_model.objects.get_by_natural_key(username)
        except user_model.DoesNotExist:
            if not options["create_user"]:
                raise CommandError(
                    f"No user {username!r}; pass --create-user to create one."
                ) from None
            user = user_model.objects.create_user(username=username)
            self.stderr.write(f"Created user {username!r}.")
        key, token = ApiKey.objects.issue(
            user,
            name=options["name"],
            expires_in=timedelta(days=days) if days else None,
            limits=limits,
        )
        expiry = key.expires_at.isoformat() if key.expires_at else "never"
        self.stderr.write(
            f"Key {key.prefix} for {username!r}, expires {expiry}, limits: {describe(limits)}."
        )
        self.stdout.write(token)
