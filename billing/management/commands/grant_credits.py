"""``manage.py grant_credits USERNAME AMOUNT [--note TEXT]`` (USD, decimal)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.models import LedgerKind
from billing.money import format_usd
from billing.services import balance_of, grant_credits


class Command(BaseCommand):
    help = "Grant credits (USD) to a user; a negative amount is an adjustment."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("amount", help="USD, e.g. 20 or 0.50 or -5")
        parser.add_argument("--note", default="")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            amount = Decimal(options["amount"])
        except InvalidOperation:
            raise CommandError(f"Not a decimal amount: {options['amount']!r}") from None
        if not amount.is_finite() or amount == 0:
            raise CommandError("The amount must be a non-zero number.")
        user_model = get_user_model()
        try:
            user = user_model.objects.get_by_natural_key(options["username"])
        except user_model.DoesNotExist:
            raise CommandError(f"No user {options['username']!r}.") from None
        kind = LedgerKind.GRANT if amount > 0 else LedgerKind.ADJUSTMENT
        grant_credits(
            user, amount, note=options["note"] or "granted from the command line", kind=kind
        )
        balance = format_usd(balance_of(user))
        self.stdout.write(
            f"{kind.label} of ${format_usd(amount)} to {user}; balance now ${balance}."
        )
