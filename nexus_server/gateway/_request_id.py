"""The `x-nexus-request-id` header: a write's idempotency key, repeated where Envoy can
read it.

An Envoy in front of several replicas (`nexus envoy-config --upstream`) retries a write
on another replica only when it carries this header, because only a write with a
`request_id` is safe to run twice (the second run returns the first result). Envoy
cannot read the body, so the header is the client's word for it; this check keeps that
word: a call whose header does not name the request's own `request_id` (a request
without one, or with another) is refused before it runs, instead of being retried into
a second run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import message

from .._errors import ApiError

__all__ = ["REQUEST_ID_HEADER", "check_request_id_header"]

REQUEST_ID_HEADER = "x-nexus-request-id"


def check_request_id_header(metadata: Iterable[tuple[str, Any]], request: Any) -> None:
    """Raise REQUEST_INVALID when the call carries `REQUEST_ID_HEADER` and `request`
    (a message) has no `request_id` equal to it."""
    header = next((v for k, v in metadata if k == REQUEST_ID_HEADER), None)
    if header is None or not isinstance(request, message.Message):
        return
    if "request_id" not in request.DESCRIPTOR.fields_by_name:
        raise ApiError(
            "REQUEST_INVALID",
            f"the {REQUEST_ID_HEADER} header goes only with a request that takes a "
            "request_id (an Envoy in front of replicas retries such a call); this one "
            "takes none: leave the header out",
            [("request_id", f"this request has no request_id for {REQUEST_ID_HEADER}")],
        )
    if header != getattr(request, "request_id", ""):
        raise ApiError(
            "REQUEST_INVALID",
            f"the {REQUEST_ID_HEADER} header must repeat the request's request_id (an "
            "Envoy in front of replicas retries the call on the header's word): set "
            "request_id to the header's value, or leave the header out",
            [("request_id", f"differs from the {REQUEST_ID_HEADER} header")],
        )
