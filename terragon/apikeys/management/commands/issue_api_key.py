"""``manage.py issue_api_key USERNAME``: print a new token as the last line."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from terragon.apikeys.models import ApiKey


class Command(BaseCommand):
    help = "Issue an API key for a user and print its token (shown only once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--create-user", action="store_true", help="Create the user if absent.")
        parser.add_argument("--name", default="cli", help="A name to recognise the key by.")
        parser.add_argument("--expires-days", type=int, default=None, help="Lifetime in days.")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        username = options["username"]
        days = options["expires_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-days must be positive.")
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
            user, name=options["name"], expires_in=timedelta(days=days) if days else None
        )
        expiry = key.expires_at.isoformat() if key.expires_at else "never"
        self.stderr.write(f"Key {key.prefix} for {username!r}, expires {expiry}.")
        self.stdout.write(token)
