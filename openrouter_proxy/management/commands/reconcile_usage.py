"""``manage.py reconcile_usage``: settle what the proxy could not settle itself.

First the meter writes every record a crash or an outage left unwritten (a
spool of charges that could not reach the database, the requests of workers
that died). Then OpenRouter's generation endpoint is asked for the cost of
every record still pending (read by ``parse_generation``, the same rule as
in-process settlement: for BYOK, OpenRouter's fee plus the provider's price),
and the meter settles it. It is idempotent and safe to run from cron on
several hosts at once, as long as the meter settles each record at most once.
Records still unknown after ``--give-up-after`` hours are given up ("unpriced"
for billing's meter, for an operator to see).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from openrouter_proxy.metering import get_meter
from openrouter_proxy.settlement import generation_request, parse_generation


class Command(BaseCommand):
    help = "Write what a crash left unwritten and settle pending records from generation stats."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--limit", type=int, default=1000, help="Records to look at per run.")
        parser.add_argument(
            "--give-up-after",
            type=float,
            default=24.0,
            help="Hours after which a record with no known cost is given up.",
        )
        parser.add_argument(
            "--min-age", type=float, default=5.0, help="Seconds a record must have waited."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        meter = get_meter()
        if meter is None:
            raise CommandError("OPENROUTER_PROXY_METER names no meter: nothing is metered.")
        recovery = meter.recover(options["limit"])
        now = timezone.now()
        give_up_before = now - timedelta(hours=options["give_up_after"])
        pending = meter.pending(now - timedelta(seconds=options["min_age"]), options["limit"])
        settled = unknown = given_up = 0
        with httpx.Client(timeout=10, trust_env=False, follow_redirects=False) as client:
            for index, record in enumerate(pending, start=1):
                stats = None
                if record.generation_id:
                    url, params, headers = generation_request(record.generation_id)
                    try:
                        response = client.get(url, params=params, headers=headers)
                    except httpx.HTTPError as error:
                        self.stderr.write(f"request {record.request_id}: {error}")
                    else:
                        if response.status_code == 200:
                            stats = parse_generation(response.content)
                if stats is not None:
                    settled += meter.settle(record.request_id, stats)
                elif record.created_at < give_up_before:
                    given_up += meter.give_up(
                        record.request_id, "no cost known after reconciliation"
                    )
                else:
                    unknown += 1
                if index % 100 == 0:
                    self.stderr.write(f"… {index}/{len(pending)} pending records looked at")
        self.stdout.write(
            f"reconcile_usage: {recovery.replayed} spooled replayed, {recovery.recovered} "
            f"recovered from dead workers, {len(pending)} pending looked at, "
            f"{settled} settled, {unknown} still pending, {given_up} marked unpriced."
        )
