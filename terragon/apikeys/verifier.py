"""The site's default key verifier for the proxy and the billing API.

One indexed lookup by prefix (the key and its user in one statement), then a
constant-time comparison of the secret's HMAC. When no row has that prefix the
HMAC is still computed and compared, so a probe cannot tell a wrong prefix
from a wrong secret by timing.
"""

from __future__ import annotations

import functools
import hmac
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connections, router
from django.db.models import Field, Model
from django.db.models.expressions import Col
from django.utils import timezone

from openrouter_proxy.callers import ApiKeyRejected, Caller
from terragon.apikeys.models import ApiKey
from terragon.apikeys.tokens import hash_secret, parse_token

# Compared against when no key has the presented prefix.
_NO_KEY_HASH = "0" * 64


def last_used_interval() -> timedelta:
    return timedelta(seconds=getattr(settings, "TERRAGON_API_KEY_LAST_USED_INTERVAL", 300))


#: The key's fields the verifier reads, and its user's.
KEY_FIELDS = (
    "id",
    "prefix",
    "secret_hash",
    "expires_at",
    "revoked_at",
    "last_used_at",
    "spend_limit",
    "daily_spend_limit",
    "requests_per_minute",
    "user",
)
USER_FIELDS = ("id", "username", "is_active")


def _user_model() -> type[Model]:
    model = ApiKey._meta.get_field("user").related_model
    assert isinstance(model, type)
    return model


@functools.cache
def _lookup(alias: str) -> tuple[str, list[Col], list[list[Any]]]:
    """The one statement finding a key and its user by prefix, and each column's converters.

    The query the ORM would build (``select_related("user").only(...)``),
    compiled once: compiling it cost more than running it, and the proxy
    verifies every key in use again every ``OPENROUTER_PROXY_KEY_CACHE_SECONDS``.
    The values go through the converters the ORM applies.
    """
    connection = connections[alias]
    quote = connection.ops.quote_name
    user_model = _user_model()

    def col(model: type[Model], name: str) -> Col:
        field = model._meta.get_field(name)
        assert isinstance(field, Field)
        return Col(model._meta.db_table, field)

    def sql_of(column: Col) -> str:
        return f"{quote(column.alias)}.{quote(str(column.target.column))}"

    def in_model_order(model: type[Model], names: tuple[str, ...]) -> list[Col]:
        # Model.from_db takes a subset of the fields in the model's own order.
        wanted = {model._meta.get_field(name) for name in names}
        return [col(model, f.name) for f in model._meta.concrete_fields if f in wanted]

    columns = in_model_order(ApiKey, KEY_FIELDS) + in_model_order(user_model, USER_FIELDS)
    sql = (
        f"SELECT {', '.join(map(sql_of, columns))} "  # noqa: S608 (names from the models)
        f"FROM {quote(ApiKey._meta.db_table)} INNER JOIN {quote(user_model._meta.db_table)} "
        f"ON {sql_of(col(user_model, user_model._meta.pk.name))} = {sql_of(col(ApiKey, 'user'))} "
        f"WHERE {sql_of(col(ApiKey, 'prefix'))} = %s"
    )
    converters = [
        connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        for column in columns
    ]
    return sql, columns, converters


def _find_key(prefix: str) -> ApiKey | None:
    """The key with this (unique) prefix and its user, as the ORM would load them, or None."""
    alias = router.db_for_read(ApiKey)
    sql, columns, converters = _lookup(alias)
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute(sql, [prefix])
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row)
    for index, (column, functions) in enumerate(zip(columns, converters, strict=True)):
        for convert in functions:
            values[index] = convert(values[index], column, connection)
    count = len(KEY_FIELDS)
    names = [column.target.attname for column in columns]
    key = ApiKey.from_db(alias, names[:count], values[:count])
    user = _user_model().from_db(alias, names[count:], values[count:])
    key.user = user  # type: ignore[assignment]
    return key


def verify_api_key(token: str) -> Caller | None:
    parsed = parse_token(token)
    if parsed is None:
        return None
    key = _find_key(parsed.prefix)
    presented = hash_secret(parsed.secret)
    if not hmac.compare_digest(presented, key.secret_hash if key else _NO_KEY_HASH) or not key:
        return None
    now = timezone.now()
    if key.revoked_at is not None:
        raise ApiKeyRejected("This API key has been revoked.")
    if key.is_expired(now):
        raise ApiKeyRejected("This API key has expired.")
    if not key.user.is_active:
        raise ApiKeyRejected("The account of this API key is disabled.")
    # Record use at most once per interval: a write per request would turn
    # every proxied call into a row update on a hot row.
    if key.last_used_at is None or now - key.last_used_at >= last_used_interval():
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    limits = key.limits
    return Caller(user=key.user, key_id=key.pk, key_label=f"tg_{key.prefix}", limits=limits or None)
