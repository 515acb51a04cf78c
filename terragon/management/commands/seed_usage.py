"""``manage.py seed_usage``: a large, realistic, consistent data set for a scratch database.

For measuring the operators' pages at scale (a million usage records, a few
hundred users) and for looking at them with believable numbers. The data is
deterministic for a given ``--seed``: the same command gives the same rows.

What it writes, in one transaction:

* users (``<name><n>@seed.example``, no usable password) and their credit accounts;
* usage records spread over ``--days`` days, busier on weekdays and in the
  working hours, growing towards today, with a skewed spend per user, a mix of
  models, outcomes and settlements like the proxy's (a few pending and
  unpriced records for the operators' attention);
* one opening grant per user and one usage ledger row per billed record, and
  balances equal to the sum of each user's ledger, so ``check_ledger`` passes.

Usage rows go in as prepared values with ``executemany`` in batches, in time
order (as a live table grows); their ledger rows follow in one
``INSERT ... SELECT``. The ledger invariant is kept by construction instead of
through ``billing.services``, which would take one transaction per request.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.utils import timezone

from billing.models import (
    CostSource,
    CreditAccount,
    CreditLedgerEntry,
    LedgerKind,
    Outcome,
    Settlement,
    UsageRecord,
)
from billing.money import from_units

EMAIL_DOMAIN = "seed.example"
FIRST_NAMES = [
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
    "olivia",
    "peggy",
    "rupert",
    "sybil",
    "trent",
    "victor",
    "walter",
    "xena",
    "yusuf",
    "zoe",
    "amara",
    "bruno",
    "chen",
    "dana",
    "emeka",
    "fatima",
    "goran",
    "hana",
    "igor",
    "jun",
    "kofi",
    "lena",
    "mateo",
    "nadia",
    "oscar",
    "priya",
    "quinn",
    "rosa",
]


@dataclass(frozen=True)
class SeedModel:
    """A served model with its price in pico-dollars per token."""

    requested: str
    served: str
    prompt: int
    completion: int
    cache_read: int
    weight: float


# Prices per token, in pico-dollars (USD per million tokens x 10⁶).
SEED_MODELS = (
    SeedModel("x-ai/grok-code-fast-1", "x-ai/grok-code-fast-1", 200_000, 1_500_000, 20_000, 40),
    SeedModel("qwen/qwen3-coder:exacto", "qwen/qwen3-coder", 380_000, 1_530_000, 380_000, 22),
    SeedModel(
        "moonshotai/kimi-k2-0905:exacto", "moonshotai/kimi-k2-0905", 600_000, 2_500_000, 150_000, 16
    ),
    SeedModel("z-ai/glm-4.6:exacto", "z-ai/glm-4.6", 550_000, 2_150_000, 100_000, 14),
    SeedModel("anthropic/claude-sonnet-4.5", "anthropic/claude-sonnet-4.5", 3_000_000, 15_000_000,
              300_000, 6),
    SeedModel("z-ai/glm-4.5-air:free", "z-ai/glm-4.5-air:free", 0, 0, 0, 2),
)  # fmt: skip

OUTCOMES = (
    (Outcome.COMPLETED, 0.935),
    (Outcome.UPSTREAM_ERROR, 0.03),
    (Outcome.CLIENT_DISCONNECTED, 0.025),
    (Outcome.UPSTREAM_UNREACHABLE, 0.01),
)


USAGE_COLUMNS = (
    "request_id",
    "user_id",
    "api_key_id",
    "api_key_label",
    "requested_model",
    "model",
    "endpoint",
    "streamed",
    "outcome",
    "settlement",
    "cost_source",
    "http_status",
    "generation_id",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "provider_cost",
    "billed",
    "holds_slot",
    "upstream_latency_ms",
    "ttfb_ms",
    "error_message",
    "created_at",
    "settled_at",
)
EMPTY_ROW: dict[str, Any] = {
    **dict.fromkeys(USAGE_COLUMNS),
    "api_key_label": "",
    "requested_model": "",
    "model": "",
    "billed": 0,
    "holds_slot": False,
    "error_message": "",
}


def insert_statement(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(connection.ops.quote_name(column) for column in columns)
    placeholders = ", ".join(["%s"] * len(columns))
    # Names come from the models' metadata, values are parameters.
    table_name = connection.ops.quote_name(table)
    return f"INSERT INTO {table_name} ({names}) VALUES ({placeholders})"  # noqa: S608


def usage_reference_sql() -> str:
    """SQL for ``'usage:' || request_id`` as ``billing.services`` writes it (with dashes)."""
    if connection.vendor == "postgresql":
        return "'usage:' || u.request_id::text"
    # SQLite keeps a UUID as 32 hex digits.
    parts = ("1, 8", "9, 4", "13, 4", "17, 4", "21, 12")
    return "'usage:' || " + " || '-' || ".join(f"substr(u.request_id, {p})" for p in parts)


@dataclass
class SeedUser:
    pk: int
    username: str
    model_weights: list[float]
    spent_units: int = 0


class Command(BaseCommand):
    help = "Seed a scratch database with realistic usage records, ledger rows and balances."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--records", type=int, default=100_000)
        parser.add_argument("--users", type=int, default=50)
        parser.add_argument("--days", type=int, default=60, help="spread over this many days")
        parser.add_argument(
            "--seed", type=int, default=1, help="random seed (same seed, same data)"
        )
        parser.add_argument("--batch-size", type=int, default=5_000)

    def handle(self, *args: Any, **options: Any) -> None:
        records, users, days = options["records"], options["users"], options["days"]
        if records < 0 or users < 1 or days < 1 or options["batch_size"] < 1:
            raise CommandError("--records must be ≥ 0; --users, --days, --batch-size ≥ 1.")
        User = get_user_model()
        if User.objects.filter(email__endswith=f"@{EMAIL_DOMAIN}").exists():
            raise CommandError(
                f"This database already has seeded users (@{EMAIL_DOMAIN}): "
                "seed a fresh scratch database instead."
            )
        self.rng = random.Random(options["seed"])
        self.now = timezone.now()
        self.batch_size = options["batch_size"]
        self.usage_insert = insert_statement(UsageRecord._meta.db_table, USAGE_COLUMNS)
        started = time.monotonic()
        with transaction.atomic():
            seed_users = self.create_users(users)
            written, billed = self.create_usage(seed_users, records, days)
            grants = self.open_accounts(seed_users, days)
        elapsed = time.monotonic() - started
        if connection.vendor == "postgresql":
            # Fresh statistics for the planner; VACUUM also marks the pages
            # all-visible, which index-only scans need (not possible inside a
            # transaction, as in tests).
            command = "ANALYZE" if connection.in_atomic_block else "VACUUM (ANALYZE)"
            self.stderr.write(f"{command} of the tables …")
            with connection.cursor() as cursor:
                for table in ("billing_usagerecord", "billing_creditledgerentry", "auth_user"):
                    cursor.execute(f"{command} {table}")
        total_spent = sum(user.spent_units for user in seed_users)
        self.stdout.write(
            f"seed_usage: {len(seed_users)} users, {written:,} usage records "
            f"({billed:,} billed, ${from_units(total_spent):,.2f}), "
            f"{grants} grants, over {days} days, in {elapsed:.1f} s."
        )

    # --- users --------------------------------------------------------------

    def create_users(self, count: int) -> list[SeedUser]:
        User = get_user_model()
        unusable = make_password(None)
        names = [f"{FIRST_NAMES[i % len(FIRST_NAMES)]}{i + 1}" for i in range(count)]
        User.objects.bulk_create(
            [
                User(
                    username=name,
                    email=f"{name}@{EMAIL_DOMAIN}",
                    password=unusable,
                    date_joined=self.now - timedelta(days=90),
                )
                for name in names
            ],
            batch_size=self.batch_size,
        )
        pks = dict(User.objects.filter(username__in=names).values_list("username", "pk"))
        seed_users = []
        for name in names:
            favourite = self.rng.randrange(len(SEED_MODELS))
            weights = [
                model.weight * (6 if index == favourite else 1)
                for index, model in enumerate(SEED_MODELS)
            ]
            seed_users.append(SeedUser(pk=pks[name], username=name, model_weights=weights))
        self.stderr.write(f"{count} users created")
        return seed_users

    # --- usage ----------------------------------------------------------------

    def moments(self, count: int, days: int) -> Iterator[datetime]:
        """``count`` instants over the last ``days`` days, oldest first."""
        start = self.now - timedelta(days=days)
        hour_weights = [0.25 if hour < 7 or hour > 21 else 1.0 for hour in range(24)]
        weights: list[float] = []
        for day in range(days):
            moment = start + timedelta(days=day)
            weekend = 0.45 if moment.weekday() >= 5 else 1.0
            growth = 0.6 + 0.8 * day / days
            weights.extend(weekend * growth * hour_weight for hour_weight in hour_weights)
        cumulative = list(itertools.accumulate(weights))
        total = cumulative[-1]
        hours = sorted(
            bisect.bisect_left(cumulative, self.rng.random() * total) for _ in range(count)
        )
        base = start.replace(minute=0, second=0, microsecond=0)
        for hour in hours:
            offset = timedelta(hours=hour, seconds=self.rng.random() * 3600)
            yield min(base + offset, self.now - timedelta(seconds=1))

    def create_usage(self, users: list[SeedUser], count: int, days: int) -> tuple[int, int]:
        rng = self.rng
        # A few heavy users, a long tail: spend is skewed like real traffic.
        user_weights = list(
            itertools.accumulate(1 / (rank + 1) ** 0.9 for rank in range(len(users)))
        )
        outcome_weights = list(itertools.accumulate(weight for _, weight in OUTCOMES))
        written = billed_count = 0
        started = time.monotonic()
        batch: list[dict[str, Any]] = []
        for moment in self.moments(count, days):
            user = users[bisect.bisect_left(user_weights, rng.random() * user_weights[-1])]
            batch.append(self.usage_record(user, moment, outcome_weights))
            if len(batch) >= self.batch_size:
                billed_count += self.write_batch(batch)
                written += len(batch)
                batch = []
                self.progress(written, count, started)
        if batch:
            billed_count += self.write_batch(batch)
            written += len(batch)
            self.progress(written, count, started)
        self.charge_in_ledger()
        return written, billed_count

    def charge_in_ledger(self) -> None:
        """One usage ledger row per billed seeded record, in one statement."""
        ledger = connection.ops.quote_name(CreditLedgerEntry._meta.db_table)
        usage = connection.ops.quote_name(UsageRecord._meta.db_table)
        users = connection.ops.quote_name(get_user_model()._meta.db_table)
        started = time.monotonic()
        # Names come from the models' metadata; values are parameters.
        select = f"SELECT u.user_id, %s, -u.billed, {usage_reference_sql()}, '', u.id, u.settled_at"
        source = f"FROM {usage} u WHERE u.billed <> 0 AND u.user_id IN"
        seeded = f"(SELECT id FROM {users} WHERE email LIKE %s)"  # noqa: S608
        columns = "(user_id, kind, amount, reference, note, usage_record_id, created_at)"
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {ledger} {columns} {select} {source} {seeded}",
                [LedgerKind.USAGE, f"%@{EMAIL_DOMAIN}"],
            )
            rows = cursor.rowcount
        self.stderr.write(
            f"{rows:,} usage ledger rows written in {time.monotonic() - started:.1f} s"
        )

    def usage_record(
        self, user: SeedUser, moment: datetime, outcome_weights: list[float]
    ) -> dict[str, Any]:
        rng = self.rng
        model = rng.choices(SEED_MODELS, weights=user.model_weights)[0]
        draw = rng.random() * outcome_weights[-1]
        outcome = OUTCOMES[bisect.bisect_left(outcome_weights, draw)][0]
        streamed = rng.random() < 0.85
        request_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        ttfb = int(rng.lognormvariate(6.6, 0.6))  # ~700 ms
        latency = ttfb + int(rng.lognormvariate(8.8, 0.9))  # + ~7 s
        row: dict[str, Any] = {
            **EMPTY_ROW,
            "request_id": request_id,
            "user_id": user.pk,
            "api_key_label": f"tg_seed{user.pk:05d}",
            "requested_model": model.requested,
            "endpoint": "chat/completions" if rng.random() < 0.97 else "completions",
            "streamed": streamed,
            "outcome": outcome,
            "created_at": moment,
            "upstream_latency_ms": latency,
            "ttfb_ms": ttfb if streamed else None,
        }
        if outcome in (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_UNREACHABLE):
            unreachable = outcome == Outcome.UPSTREAM_UNREACHABLE
            status = 502 if unreachable else rng.choice((429, 429, 500, 502, 503))
            row.update(
                settlement=Settlement.SETTLED,
                cost_source=CostSource.NONE,
                http_status=status,
                upstream_latency_ms=min(latency, 3000),
                ttfb_ms=None,
                error_message="OpenRouter is unreachable." if unreachable else f"HTTP {status}",
                settled_at=moment,
            )
            return row
        prompt = int(rng.lognormvariate(9.6, 0.9))  # ~15k tokens, long tail
        completion = int(rng.lognormvariate(6.2, 0.8))  # ~500 tokens
        cached = int(prompt * rng.random() * 0.8)
        reasoning = int(completion * rng.random() * 0.3) if rng.random() < 0.3 else 0
        cost_units = (
            (prompt - cached) * model.prompt + cached * model.cache_read
        ) + completion * model.completion
        row.update(
            model=model.served,
            http_status=200,
            generation_id=f"gen-seed-{request_id.hex}",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cache_write_tokens=0,
            reasoning_tokens=reasoning,
        )
        if outcome == Outcome.CLIENT_DISCONNECTED:
            # Settled later from generation stats; the last few minutes are still
            # pending, and a few never got a cost.
            if self.now - moment < timedelta(minutes=20):
                row.update(settlement=Settlement.PENDING, cost_source=CostSource.NONE)
                return row
            if rng.random() < 0.02:
                row.update(
                    settlement=Settlement.UNPRICED,
                    cost_source=CostSource.NONE,
                    error_message="generation stats never arrived",
                )
                return row
            source = CostSource.GENERATION
        else:
            source = CostSource.PROVIDER if rng.random() < 0.97 else CostSource.PRICE_TABLE
        row.update(
            settlement=Settlement.SETTLED,
            cost_source=source,
            provider_cost=cost_units,
            billed=cost_units,
            settled_at=moment + timedelta(milliseconds=latency),
        )
        user.spent_units += cost_units
        return row

    def write_batch(self, batch: list[dict[str, Any]]) -> int:
        """Insert raw rows (money already in pico-dollars) with one ``executemany``.

        The ORM's per-field preparation would cost more than the database
        does; the values here are already what the columns hold.
        """
        adapt = connection.ops.adapt_datetimefield_value
        uuid_field = UsageRecord._meta.get_field("request_id")
        rows = []
        for row in batch:
            row["request_id"] = uuid_field.get_db_prep_value(row["request_id"], connection)
            row["created_at"] = adapt(row["created_at"])
            row["settled_at"] = adapt(row["settled_at"])
            rows.append(tuple(row[column] for column in USAGE_COLUMNS))
        with connection.cursor() as cursor:
            cursor.executemany(self.usage_insert, rows)
        return sum(1 for row in batch if row["billed"])

    def progress(self, written: int, total: int, started: float) -> None:
        if written % (self.batch_size * 10) and written != total:
            return
        elapsed = time.monotonic() - started
        rate = written / elapsed if elapsed else 0
        self.stderr.write(
            f"  {written:>10,} / {total:,} usage records ({written / total:.0%}), "
            f"{elapsed:.0f} s, {rate:,.0f}/s"
        )

    # --- grants and balances -------------------------------------------------

    def open_accounts(self, users: list[SeedUser], days: int) -> int:
        """One opening grant each; balance = grant - spend = the sum of the ledger."""
        opened = self.now - timedelta(days=days + 1)
        grants = []
        accounts = []
        for user in users:
            spent = from_units(user.spent_units)
            if self.rng.random() < 0.1:
                # Nearly out of credit: these show up as low balances.
                grant = spent + Decimal(self.rng.randrange(0, 300)) / 100
            else:
                grant = Decimal(max(10, int(spent * Decimal("1.3")) // 10 * 10 + 10))
            grants.append(
                CreditLedgerEntry(
                    user_id=user.pk,
                    kind=LedgerKind.GRANT,
                    amount=grant,
                    reference=f"seed-grant:{user.username}",
                    note="seed: opening credit",
                    created_at=opened,
                )
            )
            accounts.append(
                CreditAccount(user_id=user.pk, balance=grant - spent, created_at=opened)
            )
        CreditLedgerEntry.objects.bulk_create(grants, batch_size=self.batch_size)
        CreditAccount.objects.bulk_create(accounts, batch_size=self.batch_size)
        self.stderr.write(f"{len(accounts)} accounts opened with their grants")
        return len(grants)
