"""The format of a Terragon API key and how its secret is stored.

A token reads ``tg_<prefix>_<secret>``: ``tg_`` makes a leaked key easy to
recognise (and to scan for), the prefix is a public, indexed handle for the
row, and the secret carries 32 random bytes. Only an HMAC-SHA256 of the secret,
keyed with a server-side pepper, is stored. A slow password hasher would buy
nothing against 256 bits of randomness and would cost every proxied request
milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

from django.conf import settings

TOKEN_MARKER = "tg"  # noqa: S105  (a public marker, not a secret)
PREFIX_LENGTH = 12
SECRET_BYTES = 32
# token_urlsafe(32) gives 43 characters; anything much longer is not ours.
MAX_TOKEN_LENGTH = 128
PREFIX_ALPHABET = frozenset(string.ascii_lowercase + string.digits)
SECRET_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


@dataclass(frozen=True, slots=True)
class ParsedToken:
    prefix: str
    secret: str


def generate_token() -> tuple[str, ParsedToken]:
    """A new random token and its parts."""
    prefix = "".join(secrets.choice(sorted(PREFIX_ALPHABET)) for _ in range(PREFIX_LENGTH))
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return f"{TOKEN_MARKER}_{prefix}_{secret}", ParsedToken(prefix=prefix, secret=secret)


def parse_token(token: str) -> ParsedToken | None:
    """Split a token into prefix and secret, or ``None`` if it is not one of ours.

    Cheap structural checks run before any database access, so garbage costs
    nothing but this function.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    marker, sep, rest = token.partition("_")
    if marker != TOKEN_MARKER or not sep:
        return None
    prefix, sep, secret = rest.partition("_")
    if not sep or len(prefix) != PREFIX_LENGTH or not set(prefix) <= PREFIX_ALPHABET:
        return None
    if len(secret) < 32 or not set(secret) <= SECRET_ALPHABET:
        return None
    return ParsedToken(prefix=prefix, secret=secret)


def hash_secret(secret: str) -> str:
    pepper = settings.TERRAGON_API_KEY_PEPPER
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
