"""Signed opaque tokens (page tokens): HMAC-SHA256 with a per-database secret.

A token is ``base64url(mac || payload)``. The MAC covers a *context* as well as the
payload (for a listing: the model, the order and a digest of the filter), so a token is
only accepted where it was issued, and nothing in a token is parsed before its MAC
checks out: a forged or altered token, or one from another listing, is refused without
looking inside it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from ._errors import ValidationError

__all__ = ["MAC_BYTES", "sign", "verify"]

MAC_BYTES = 32


def _mac(secret: bytes, context: str, payload: bytes) -> bytes:
    ctx = context.encode("utf-8", "surrogatepass")
    msg = b"%d:" % len(ctx) + ctx + payload
    return hmac.new(secret, msg, hashlib.sha256).digest()


def sign(secret: bytes, context: str, payload: bytes) -> str:
    """The token carrying `payload`, valid only with the same `context`."""
    raw = _mac(secret, context, payload) + payload
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def verify(secret: bytes, context: str, token: str, field: str = "page_token") -> bytes:
    """The payload of a token `sign` made with this secret and context.

    Raises:
        ValidationError: on `field` for anything else (never says more: a token is
            either ours, for this context, or not).
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, binascii.Error, TypeError):
        raw = b""
    mac, payload = raw[:MAC_BYTES], raw[MAC_BYTES:]
    if len(mac) < MAC_BYTES or not hmac.compare_digest(mac, _mac(secret, context, payload)):
        raise ValidationError(
            field,
            "is not a token returned by this listing (a token is only valid with the same "
            "model, filter and order_by that returned it)",
        )
    return payload
