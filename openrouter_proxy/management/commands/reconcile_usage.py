"""``manage.py reconcile_usage``: settle what the proxy could not settle itself.

Replays the spool of charges that could not reach the database, writes the
records of requests whose worker died (``billing.recovery``), then asks
OpenRouter's generation endpoint for the cost of every pending record (read
by ``parse_generation``, the same rule as in-process settlement: for BYOK,
OpenRouter's fee plus the provider's price). It is
idempotent and safe to run from cron on several hosts at once: a record is
settled inside a transaction that first locks it and checks it is still
pending. Records still unknown after ``--give-up-after`` hours become
"unpriced", for an operator to see, and free their in-flight slot.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from billing.models import UsageRecord
from billing.recovery import recover_lost_requests
from billing.services import give_up_pending
from billing.spool import replay_spool
from openrouter_proxy.settlement import apply_generation_cost, generation_request, parse_generation


class Command(BaseCommand):
    help = "Replay spooled charges and settle pending usage records from generation stats."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--limit", type=int, default=1000, help="Records to look at per run.")
        parser.add_argument(
            "--give-up-after",
            type=float,
            default=24.0,
            help="Hours after which a record with no known cost is marked unpriced.",
        )
        parser.add_argument(
            "--min-age", type=float, default=5.0, help="Seconds a record must have waited."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        replayed = replay_spool()
        # Requests of workers that died: recorded now, pending when the upstream
        # had answered, so the loop below settles them like any other.
        recovered = len(recover_lost_requests(limit=options["limit"]))
        now = timezone.now()
        give_up_before = now - timedelta(hours=options["give_up_after"])
        pending = list(
            UsageRecord.objects.pending()
            .filter(created_at__lte=now - timedelta(seconds=options["min_age"]))
            .order_by("created_at")
            .values_list("pk", "generation_id", "created_at")[: options["limit"]]
        )
        settled = unknown = given_up = 0
        with httpx.Client(timeout=10, trust_env=False, follow_redirects=False) as client:
            for index, (record_id, generation_id, created_at) in enumerate(pending, start=1):
                stats = None
                if generation_id:
                    url, params, headers = generation_request(generation_id)
                    try:
                        response = client.get(url, params=params, headers=headers)
                    except httpx.HTTPError as error:
                        self.stderr.write(f"record {record_id}: {error}")
                    else:
                        if response.status_code == 200:
                            stats = parse_generation(response.content)
                if stats is not None:
                    settled += apply_generation_cost(record_id, stats)
                elif created_at < give_up_before:
                    given_up += give_up_pending(record_id, "no cost known after reconciliation")
                else:
                    unknown += 1
                if index % 100 == 0:
                    self.stderr.write(f"… {index}/{len(pending)} pending records looked at")
        self.stdout.write(
            f"reconcile_usage: {replayed} spooled replayed, {recovered} recovered from dead "
            f"workers, {len(pending)} pending looked at, "
            f"{settled} settled, {unknown} still pending, {given_up} marked unpriced."
        )
