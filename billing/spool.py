"""A durable fallback for charges the database could not take.

When recording a request's usage fails even after retries (the database is
down or unreachable), the draft is written to a file in
``BILLING_SPOOL_DIR`` (one file per request, written atomically and fsynced)
and logged at ERROR level. :func:`replay_spool` writes the drafts to the
database later; it runs in every worker after a successful recording and in
``manage.py reconcile_usage``. Replays are idempotent: ``request_id`` is
unique, so a draft recorded twice is charged once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.db import DatabaseError, IntegrityError, connection

from billing.conf import billing_settings
from billing.services import Recorded, UsageDraft, record_usage
from billing.usage import ReportedUsage

logger = logging.getLogger(__name__)


def draft_to_json(draft: UsageDraft) -> str:
    def encode(value: Any) -> Any:
        if isinstance(value, Decimal):
            return str(value)
        if isinstance(value, uuid.UUID):
            return str(value)
        if isinstance(value, datetime):
            return value.isoformat()
        raise TypeError(type(value))

    return json.dumps(dataclasses.asdict(draft), default=encode, sort_keys=True)


def draft_from_json(text: str) -> UsageDraft:
    data = json.loads(text)
    usage = dict(data.pop("usage"))
    for name in ("cost", "upstream_inference_cost"):
        if usage.get(name) is not None:
            usage[name] = Decimal(usage[name])
    return UsageDraft(
        **{
            **data,
            "request_id": uuid.UUID(data["request_id"]),
            "created_at": datetime.fromisoformat(data["created_at"]),
            "usage": ReportedUsage(**usage),
        }
    )


def spool_draft(draft: UsageDraft) -> Path:
    directory = billing_settings.SPOOL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{draft.request_id}.json"
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(draft_to_json(draft))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    return target


def spooled_paths() -> list[Path]:
    directory = billing_settings.SPOOL_DIR
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*-*-*-*-*.json"))


def replay_spool() -> int:
    """Record every spooled draft; returns how many were written or found done."""
    replayed = 0
    for path in spooled_paths():
        try:
            draft = draft_from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            logger.exception("unreadable spooled usage %s left in place", path)
            continue
        try:
            record_usage(draft)
        except DatabaseError:
            logger.warning("database still unavailable; %s stays spooled", path.name)
            break
        path.unlink(missing_ok=True)
        replayed += 1
    if replayed:
        logger.info("replayed %d spooled usage record(s)", replayed)
    return replayed


def record_usage_durably(draft: UsageDraft) -> Recorded | None:
    """Record usage, retrying; on persistent failure spool it. Never loses it.

    Returns ``None`` when the draft had to be spooled.
    """
    attempts = max(1, billing_settings.RECORD_ATTEMPTS)
    for attempt in range(1, attempts + 1):
        try:
            result = record_usage(draft)
        except IntegrityError:
            raise
        except DatabaseError as error:
            # The connection may be broken: drop it so the next try reconnects
            # (unless a caller's transaction owns it).
            if not connection.in_atomic_block:
                connection.close()
            if attempt == attempts:
                path = spool_draft(draft)
                logger.error(
                    "could not record usage of request %s (%s); spooled to %s for replay",
                    draft.request_id,
                    error,
                    path,
                )
                return None
            time.sleep(billing_settings.RECORD_RETRY_DELAY * attempt)
        else:
            if spooled_paths():
                replay_spool()
            return result
    return None
