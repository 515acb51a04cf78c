"""CSV export of usage records, streamed in batches.

A filter can match a million rows: the export never holds them in memory. It
reads batches of ``BATCH_SIZE`` rows by keyset pagination on
``(created_at, id)`` (newest first), so each batch is one indexed query and
the first bytes leave before the second batch is read. Under ASGI the body is
an async iterator, each batch read in the request's worker thread; under WSGI
a plain iterator. (Django buffers a sync iterator whole when serving it over
ASGI, which would defeat the point.)
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Q, QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.utils import timezone

from billing.models import UsageRecord
from billing.money import format_usd

BATCH_SIZE = 2_000

# (CSV header, queryset field)
COLUMNS = (
    ("created_at", "created_at"),
    ("user", "user__username"),
    ("model", "model"),
    ("requested_model", "requested_model"),
    ("endpoint", "endpoint"),
    ("streamed", "streamed"),
    ("outcome", "outcome"),
    ("settlement", "settlement"),
    ("cost_source", "cost_source"),
    ("http_status", "http_status"),
    ("prompt_tokens", "prompt_tokens"),
    ("completion_tokens", "completion_tokens"),
    ("cached_tokens", "cached_tokens"),
    ("reasoning_tokens", "reasoning_tokens"),
    ("provider_cost_usd", "provider_cost"),
    ("billed_usd", "billed"),
    ("latency_ms", "upstream_latency_ms"),
    ("ttfb_ms", "ttfb_ms"),
    ("api_key", "api_key_label"),
    ("generation_id", "generation_id"),
    ("request_id", "request_id"),
)
FIELDS = [name for _, name in COLUMNS]
KEY = ("created_at", "id")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format_usd(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class _CsvText:
    """Formats rows as CSV text, one chunk per batch."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer)

    def rows(self, rows: list[list[Any]]) -> str:
        self.writer.writerows(rows)
        text = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return text


def _batches(queryset: QuerySet[UsageRecord]) -> Iterator[list[tuple[Any, ...]]]:
    """Rows newest first, ``BATCH_SIZE`` at a time; each batch is a separate query."""
    ordered = queryset.order_by("-created_at", "-id").values_list(*FIELDS, *KEY)
    after: tuple[datetime, int] | None = None
    while True:
        page = ordered
        if after is not None:
            moment, pk = after
            page = page.filter(
                Q(created_at__lt=moment) | Q(created_at=moment, id__lt=pk), created_at__lte=moment
            )
        rows = list(page[:BATCH_SIZE])
        if not rows:
            return
        yield [row[: len(FIELDS)] for row in rows]
        if len(rows) < BATCH_SIZE:
            return
        after = rows[-1][-2], rows[-1][-1]


def _csv_chunks(queryset: QuerySet[UsageRecord]) -> Iterator[str]:
    text = _CsvText()
    yield text.rows([[header for header, _ in COLUMNS]])
    for batch in _batches(queryset):
        yield text.rows([[_cell(value) for value in row] for row in batch])


def _next_chunk(chunks: Iterator[str]) -> str | None:
    return next(chunks, None)


async def _csv_chunks_async(queryset: QuerySet[UsageRecord]) -> AsyncIterator[str]:
    chunks = _csv_chunks(queryset)
    # The header costs no query: send it at once.
    yield next(chunks)
    take = sync_to_async(_next_chunk, thread_sensitive=True)
    while True:
        chunk = await take(chunks)
        if chunk is None:
            return
        yield chunk


def usage_csv_response(
    request: HttpRequest, queryset: QuerySet[UsageRecord]
) -> StreamingHttpResponse:
    """Stream ``queryset`` as CSV, newest first."""
    body: Iterator[str] | AsyncIterator[str]
    if isinstance(request, ASGIRequest):
        body = _csv_chunks_async(queryset)
    else:
        body = _csv_chunks(queryset)
    response = StreamingHttpResponse(body, content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="usage-{stamp}.csv"'
    response["Cache-Control"] = "no-store"
    return response
