"""The billing REST API: a caller's balance, usage, ledger and keys.

Authenticated like the proxy (``X-Daemon-Token`` or ``Authorization: Bearer``,
checked by the host's key verifier), whatever the host's DRF defaults say.
Lists are newest first, paginated with ``count``, ``next`` and ``previous``,
and filterable by ``since``/``until`` (ISO 8601) and, for usage, ``model``.
Errors use the same OpenAI-style JSON as the proxy.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import DatabaseError
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.timezone import is_naive, make_aware
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import exceptions, serializers
from rest_framework.generics import ListAPIView
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from billing.models import CreditLedgerEntry, KeyMeter, UsageRecord
from billing.money import format_usd
from billing.services import balance_of
from openrouter_proxy.authentication import ApiKeyAuthentication
from openrouter_proxy.errors import DB_DOWN, ERROR_TYPES, error_payload

logger = logging.getLogger(__name__)


def openai_style_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DatabaseError):
        logger.exception("billing API: database unavailable")
        return Response(DB_DOWN.payload(), status=DB_DOWN.status, headers={"Retry-After": "5"})
    response = exception_handler(exc, context)
    if response is None:
        return None
    detail = response.data.get("detail") if isinstance(response.data, dict) else None
    message = str(detail) if detail is not None else str(response.data)
    code = str(getattr(detail, "code", None) or getattr(exc, "default_code", "error"))
    status = response.status_code
    # DRF's other client errors (406, 415, ...) are invalid requests too.
    error_type = None if status in ERROR_TYPES else "invalid_request_error"
    response.data = error_payload(status, message, code, error_type)
    return response


@extend_schema_field(
    {"type": "string", "pattern": r"^-?[0-9]+\.[0-9]{2,12}$", "example": "9.9999805"}
)
class MoneyString(serializers.Field):  # type: ignore[type-arg]
    """A dollar amount as a decimal string, never a float."""

    def to_representation(self, value: Decimal) -> str:
        return format_usd(value)


class UsageRecordSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    cost = MoneyString(source="billed")
    provider_cost = MoneyString(allow_null=True)
    status = serializers.CharField(source="outcome")

    class Meta:
        model = UsageRecord
        fields = [
            "id",
            "created",
            "model",
            "requested_model",
            "endpoint",
            "streamed",
            "status",
            "settlement",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "reasoning_tokens",
            "cost",
            "provider_cost",
            "cost_source",
            "generation_id",
            "latency_ms",
            "ttfb_ms",
        ]

    created = serializers.DateTimeField(source="created_at")
    latency_ms = serializers.IntegerField(source="upstream_latency_ms", allow_null=True)


class LedgerEntrySerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    amount = MoneyString()
    created = serializers.DateTimeField(source="created_at")
    usage_record: serializers.PrimaryKeyRelatedField[UsageRecord] = (
        serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    )

    class Meta:
        model = CreditLedgerEntry
        fields = ["id", "created", "kind", "amount", "note", "reference", "usage_record"]


class NewestFirstPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


def _moment(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    invalid = exceptions.ValidationError(
        {"detail": f"`{name}` must be an ISO 8601 date-time, e.g. 2026-11-01T00:00:00Z."}
    )
    try:
        moment = parse_datetime(raw)
        if moment is None:
            raise invalid
        # In UTC: databases refuse some offsets Python accepts (PostgreSQL: +16:05).
        return (make_aware(moment) if is_naive(moment) else moment).astimezone(UTC)
    except (ValueError, OverflowError):
        raise invalid from None


# --- OpenAPI descriptions (drf-spectacular) -------------------------------------------

ERROR = inline_serializer(
    "Error",
    {
        "error": inline_serializer(
            "ErrorDetail",
            {
                "message": serializers.CharField(),
                "type": serializers.CharField(),
                "code": serializers.CharField(),
            },
        )
    },
)
ERRORS = {400: ERROR, 401: ERROR, 403: ERROR, 404: ERROR}
TIME_RANGE = [
    OpenApiParameter(
        "since", OpenApiTypes.DATETIME, description="Only rows created at or after (ISO 8601)."
    ),
    OpenApiParameter(
        "until", OpenApiTypes.DATETIME, description="Only rows created before (ISO 8601)."
    ),
]


class BillingAPIView(APIView):
    # The API's own guarantees, whatever the host's DRF defaults: the proxy's keys, and
    # nothing for an anonymous caller (401, with a WWW-Authenticate header).
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsAuthenticated]

    def get_exception_handler(self) -> Any:
        return openai_style_exception_handler


class BalanceView(BillingAPIView):
    @extend_schema(
        summary="The caller's balance",
        responses={
            200: inline_serializer(
                "Balance",
                {
                    "balance": MoneyString(),
                    "currency": serializers.ChoiceField(choices=["USD"]),
                    "user": serializers.CharField(),
                },
            ),
            **ERRORS,
        },
    )
    def get(self, request: Request) -> Response:
        user = request.user
        return Response(
            {
                "balance": format_usd(balance_of(user)),
                "currency": "USD",
                "user": getattr(user, "get_username", lambda: "")(),
            }
        )


class _TimeFilteredList(BillingAPIView, ListAPIView):  # type: ignore[type-arg]
    pagination_class = NewestFirstPagination

    def filter_by_time(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        since = _moment(self.request, "since")
        until = _moment(self.request, "until")
        if since is not None:
            queryset = queryset.filter(created_at__gte=since)
        if until is not None:
            queryset = queryset.filter(created_at__lt=until)
        return queryset


@extend_schema(
    summary="The caller's usage records, newest first",
    parameters=[
        *TIME_RANGE,
        OpenApiParameter("model", str, description="Served or requested model id."),
        OpenApiParameter(
            "endpoint", str, description="Endpoint, e.g. `chat/completions` or `messages`."
        ),
    ],
    responses={200: UsageRecordSerializer(many=True), **ERRORS},
)
class UsageListView(_TimeFilteredList):
    serializer_class = UsageRecordSerializer

    def get_queryset(self) -> QuerySet[UsageRecord]:
        queryset = UsageRecord.objects.for_user(self.request.user).order_by("-created_at", "-id")
        model = self.request.query_params.get("model")
        if model:
            queryset = queryset.filter(Q(model=model) | Q(requested_model=model))
        endpoint = self.request.query_params.get("endpoint")
        if endpoint:
            queryset = queryset.filter(endpoint=endpoint)
        return self.filter_by_time(queryset)


@extend_schema(
    summary="The caller's ledger rows, newest first",
    parameters=TIME_RANGE,
    responses={200: LedgerEntrySerializer(many=True), **ERRORS},
)
class LedgerListView(_TimeFilteredList):
    serializer_class = LedgerEntrySerializer

    def get_queryset(self) -> QuerySet[CreditLedgerEntry]:
        queryset = CreditLedgerEntry.objects.for_user(self.request.user).order_by(
            "-created_at", "-id"
        )
        return self.filter_by_time(queryset)


# --- The caller's keys: spend beside limits -----------------------------------------------


class KeyMeterSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    key_id = serializers.IntegerField(source="api_key_id")
    current = serializers.SerializerMethodField(
        help_text="Whether this is the key the request was made with."
    )
    spent = MoneyString(help_text="The key's usage charges in total.")
    spent_today = serializers.SerializerMethodField(
        help_text="The key's usage charges today (UTC)."
    )
    spend_limit = MoneyString(allow_null=True)
    daily_spend_limit = MoneyString(allow_null=True)

    class Meta:
        model = KeyMeter
        fields = [
            "key_id",
            "label",
            "current",
            "spent",
            "spent_today",
            "spend_limit",
            "daily_spend_limit",
            "requests_per_minute",
        ]

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_current(self, meter: KeyMeter) -> bool:
        caller = self.context["request"].auth
        return getattr(caller, "key_id", None) == meter.api_key_id

    @extend_schema_field(MoneyString())
    def get_spent_today(self, meter: KeyMeter) -> str:
        return format_usd(meter.spent_on(timezone.now().astimezone(UTC).date()))


@extend_schema(
    summary="The caller's API keys: spend in total and today (UTC), beside their limits",
    description=(
        "Keys that have been charged or have limits. Limits are empty when not set; "
        "the account's balance applies to every key."
    ),
    responses={200: KeyMeterSerializer(many=True), **ERRORS},
)
class KeyListView(BillingAPIView, ListAPIView):  # type: ignore[type-arg]
    serializer_class = KeyMeterSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self) -> QuerySet[KeyMeter]:
        user_id = int(self.request.user.pk or 0)  # authenticated: never 0
        return KeyMeter.objects.filter(user_id=user_id).order_by("-api_key_id")
