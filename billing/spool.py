"""A durable fallback for charges the database could not take.

When recording a request's usage fails even after retries (the database is
down or unreachable), the draft is written to a file in
``BILLING_SPOOL_DIR`` (one file per request, written atomically and fsynced)
and logged at ERROR level. :func:`replay_spool` writes the drafts to the
database later; it runs in every worker after a successful recording and in
``manage.py reconcile_usage``. Replays are idempotent: ``request_id`` is
unique, so a draft recorded twice is charged once. A process runs one replay
at a time (a worker replays at most ``HOT_PATH_REPLAY_LIMIT`` files after a
request, and skips the replay if another is running), and a file that cannot
be read is set aside with an ``.unreadable`` suffix, logged once, for an
operator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.db import DatabaseError, IntegrityError, connection

from billing.conf import billing_settings
from billing.models import OpenRequest
from billing.services import Recorded, record_usage
from billing.services.recording import record_usage_many
from openrouter_proxy.metering import ReportedUsage, UsageDraft

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


# One replay at a time per process: every request that ends while files are
# spooled would otherwise start its own pass over the same files.
_replaying = threading.Lock()
# How many files a request's own recording replays at most, after which the
# next request (or ``reconcile_usage``) carries on.
HOT_PATH_REPLAY_LIMIT = 100
UNREADABLE_SUFFIX = ".unreadable"


def _set_aside(path: Path) -> None:
    """Keep an unreadable file for an operator, out of every later replay."""
    logger.exception(
        "unreadable spooled usage %s set aside as %s%s", path, path.name, UNREADABLE_SUFFIX
    )
    try:
        path.replace(path.with_name(path.name + UNREADABLE_SUFFIX))
    except OSError:
        logger.exception("could not set %s aside", path)


def replay_spool(limit: int | None = None, wait: bool = True) -> int:
    """Record spooled drafts (at most ``limit``); returns how many were written or found done.

    Without ``wait``, returns 0 at once if this process is already replaying.
    """
    if not _replaying.acquire(blocking=wait):
        return 0
    try:
        return _replay(limit)
    finally:
        _replaying.release()


def _replay(limit: int | None) -> int:
    replayed = 0
    for path in spooled_paths():
        if limit is not None and replayed >= limit:
            break
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue  # replayed meanwhile by another process
        except OSError:
            _set_aside(path)
            continue
        try:
            draft = draft_from_json(text)
        except (ValueError, TypeError, KeyError):
            _set_aside(path)
            continue
        try:
            record_usage(draft)
            # Recorded: its write-ahead trace (billing.recovery) is done with.
            OpenRequest.objects.filter(request_id=draft.request_id).delete()
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
            _replay_after_recording()
            return result
    return None


def _replay_after_recording() -> None:
    """Replay some spooled drafts, now that the database took a record (best effort)."""
    if spooled_paths():
        try:
            replay_spool(limit=HOT_PATH_REPLAY_LIMIT, wait=False)
        except Exception:
            logger.exception("replaying the spool failed; reconcile_usage will retry")


def record_usage_durably_many(drafts: Sequence[UsageDraft]) -> list[Recorded | None]:
    """:func:`record_usage_durably` for several drafts: together when the database takes them.

    The drafts go in one transaction (:func:`billing.services.recording.record_usage_many`);
    if that fails for any reason, nothing of it was written and each draft is
    recorded alone, with its own retries and spool.
    """
    if len(drafts) > 1:
        try:
            recorded: list[Recorded | None] = list(record_usage_many(drafts))
        except IntegrityError:
            pass  # one of them is recorded already, or its generation is: each alone says which
        except DatabaseError:
            if not connection.in_atomic_block:
                connection.close()
        else:
            _replay_after_recording()
            return recorded
    return [record_usage_durably(draft) for draft in drafts]
