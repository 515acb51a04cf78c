"""Building blocks of the billing admin that keep changelists fast on big tables.

A changelist asks the database three expensive questions that have nothing to
do with the rows on screen: how many rows match (for the paginator), how many
rows exist at all (``show_full_result_count``), and which values a filter
offers (``SELECT DISTINCT`` over the whole table). Here each is bounded:

* :class:`EstimatedCountPaginator` counts exactly up to a cap and, past it,
  asks PostgreSQL's planner for an estimate instead of scanning;
* :class:`UserFilter` offers the user already chosen (from a link) instead of
  listing every user;
* :func:`distinct_values` caches the choices of a column for a few minutes;
* :func:`with_period_probing` makes ``date_hierarchy`` probe the index
  instead of running ``SELECT DISTINCT`` over the table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Max, Min, Model, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.functional import cached_property

EXACT_COUNT_LIMIT = 10_000
CHOICES_CACHE_SECONDS = 300


def planner_estimate(queryset: QuerySet[Any]) -> int | None:
    """PostgreSQL's estimate of the rows a query returns, or ``None`` elsewhere."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    sql, params = queryset.order_by().query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


class EstimatedCountPaginator(Paginator):  # type: ignore[type-arg]
    """A paginator that never scans more than ``EXACT_COUNT_LIMIT`` rows to count.

    Up to the limit the count is exact (``COUNT(*)`` over a ``LIMIT``ed
    subquery). Past it, PostgreSQL's planner estimate is used (never less than
    the limit), and ``is_estimate`` tells the template to say "about". Other
    databases count exactly: they serve development-sized data.
    """

    is_estimate = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return len(queryset)
        bounded = queryset.order_by()[: EXACT_COUNT_LIMIT + 1].count()
        if bounded <= EXACT_COUNT_LIMIT:
            return bounded
        estimate = planner_estimate(queryset)
        if estimate is None:
            return queryset.count()
        self.is_estimate = True
        return max(estimate, bounded)


class UserFilter(admin.SimpleListFilter):
    """Filter by user id (``?user=<id>``), as linked from the users' page.

    Listing every user in the sidebar would be a query over all users on every
    page and unusable past a few hundred; the sidebar shows the chosen one.
    """

    title = "user"
    parameter_name = "user"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        if not value or not value.isdigit():
            return []
        user = get_user_model().objects.filter(pk=int(value)).first()
        return [(value, user.get_username() if user else f"#{value}")]

    def has_output(self) -> bool:
        return bool(self.value())

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value and value.isdigit():
            return queryset.filter(user_id=int(value))
        return queryset


def distinct_values(model: type[Model], field: str) -> list[str]:
    """The distinct non-empty values of a column, cached for a few minutes."""
    key = f"billing:admin:distinct:{model._meta.label_lower}:{field}"

    def compute() -> list[str]:
        values = model._default_manager.order_by(field).values_list(field, flat=True).distinct()
        return [value for value in values if value]

    cached = cache.get_or_set(key, compute, CHOICES_CACHE_SECONDS)
    return list(cached or [])


def cached_choices_filter(
    field: str, title: str, labels: Callable[[str], str] | None = None
) -> type[admin.SimpleListFilter]:
    """A list filter on ``field`` whose choices come from :func:`distinct_values`."""

    class CachedChoicesFilter(admin.SimpleListFilter):
        parameter_name = field

        def lookups(self, request: HttpRequest, model_admin: Any) -> Sequence[tuple[str, str]]:
            return [
                (value, labels(value) if labels else value)
                for value in distinct_values(model_admin.model, field)
            ]

        def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
            value = self.value()
            return queryset.filter(**{field: value}) if value else queryset

    CachedChoicesFilter.title = title
    CachedChoicesFilter.__name__ = f"{field.title().replace('_', '')}Filter"
    return CachedChoicesFilter


# --- Date hierarchy without DISTINCT over the table -----------------------------------------


def _period_start(moment: datetime, kind: str) -> datetime:
    moment = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind in ("month", "year"):
        moment = moment.replace(day=1)
    if kind == "year":
        moment = moment.replace(month=1)
    return moment


def _next_period(start: datetime, kind: str) -> datetime:
    if kind == "day":
        return start + timedelta(days=1)
    if kind == "month":
        return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return start.replace(year=start.year + 1)


class PeriodProbingQuerySet(QuerySet[Any]):
    """``datetimes()`` answered by indexed probes, for the admin's ``date_hierarchy``.

    ``date_hierarchy`` lists the years, months or days that have rows with
    ``SELECT DISTINCT date_trunc(...)`` over every matching row: a full scan
    of a big table on each page. Here the range comes from ``MIN``/``MAX`` and
    each candidate period (at most a few dozen) from an ``EXISTS`` on the
    indexed column.
    """

    MAX_PROBES = 400

    def datetimes(
        self, field_name: str, kind: Any, order: Any = "ASC", tzinfo: Any = None, **kwargs: Any
    ) -> Any:
        if kind not in ("year", "month", "day"):
            return super().datetimes(field_name, kind, order, tzinfo)
        bounds = self.order_by().aggregate(first=Min(field_name), last=Max(field_name))
        if bounds["first"] is None:
            return []
        zone = tzinfo or timezone.get_current_timezone()
        start = _period_start(bounds["first"].astimezone(zone), kind)
        last = bounds["last"].astimezone(zone)
        periods = []
        for _ in range(self.MAX_PROBES):
            if start > last:
                break
            end = _next_period(start, kind)
            window = {f"{field_name}__gte": start, f"{field_name}__lt": end}
            if self.filter(**window).exists():
                periods.append(start)
            start = end
        else:
            return super().datetimes(field_name, kind, order, tzinfo)
        return periods if order == "ASC" else periods[::-1]


_probing_classes: dict[type[QuerySet[Any]], type[QuerySet[Any]]] = {}


def with_period_probing(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """The same queryset, whose ``datetimes()`` probes instead of scanning."""
    base = type(queryset)
    probing = _probing_classes.get(base)
    if probing is None:
        probing = type(f"PeriodProbing{base.__name__}", (PeriodProbingQuerySet, base), {})
        _probing_classes[base] = probing
    clone = queryset.all()
    clone.__class__ = probing
    return clone
