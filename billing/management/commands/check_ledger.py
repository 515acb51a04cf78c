"""``manage.py check_ledger``: exit 1 naming accounts whose balance ≠ their ledger.

Key meters are checked too: each key's spend (in total and today) must equal
its usage charges in the ledger.
"""

from __future__ import annotations

import sys
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from billing.models import CreditAccount, KeyMeter
from billing.services import check_key_meters, check_ledger


class Command(BaseCommand):
    help = "Compare every balance with the sum of its ledger; non-zero exit on a mismatch."

    def handle(self, *args: Any, **options: Any) -> None:
        mismatches = check_ledger()
        accounts = CreditAccount.objects.count()
        keys = check_key_meters()
        for key in keys:
            self.stderr.write(
                f"MISMATCH key {key.api_key_id}: {key.counter} {key.meter} "
                f"!= ledger {key.ledger} (difference {key.meter - key.ledger})"
            )
        if not mismatches and not keys:
            self.stdout.write(
                f"ledger OK: {accounts} account(s), every balance matches its ledger; "
                f"{KeyMeter.objects.count()} key meter(s) match their charges."
            )
            return
        if not mismatches:
            self.stderr.write(f"{len(keys)} key meter counter(s) out of step with the ledger.")
            sys.exit(1)
        names = dict(
            get_user_model()
            .objects.filter(pk__in=[m.user_id for m in mismatches])
            .values_list("pk", "username")
        )
        for mismatch in mismatches:
            self.stderr.write(
                f"MISMATCH user {names.get(mismatch.user_id, mismatch.user_id)} "
                f"(id {mismatch.user_id}): balance {mismatch.balance} "
                f"!= ledger {mismatch.ledger_total} (difference {mismatch.difference})"
            )
        self.stderr.write(
            f"{len(mismatches)} of {accounts} account(s) out of step with the ledger."
        )
        sys.exit(1)
