"""The Connect protocol through Envoy: the parts of the Envoy configuration for it.

Envoy's Connect-gRPC bridge (`envoy.filters.http.connect_grpc_bridge`) turns a Connect
call (unary POST, unary GET, server stream) into a gRPC call to the server, and the
gRPC response into Connect's: messages, headers, and the error JSON with the details of
the status (`grpc-status-details-bin`), so an ErrorInfo reaches a Connect client as it
reaches a gRPC one. Three things are added around it here:

- errors (a unary error's body, a stream's end message) name each detail by its
  message name (`google.rpc.ErrorInfo`), as the Connect protocol says; the bridge
  writes the `Any`'s type URL there (`type.googleapis.com/google.rpc.ErrorInfo`), which
  clients that look details up by name (Connect-ES) cannot resolve;
- the JSON codec (`application/json`, `application/connect+json`, `encoding=json`): the
  bridge passes the JSON bytes on as the gRPC message, which the server reads as JSON
  and answers in JSON (`_errors.guard_method`); the answer's content type, which the
  bridge gives as protobuf, is set to JSON here;
- Envoy's own replies to a Connect call (a body over the limit, the server down) are
  Connect error JSON with the code and ErrorInfo the REST body would carry.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2

from ._errors import DOMAIN, code_of

__all__ = ["CONNECT_CHANNEL", "connect_code", "connect_filters", "connect_local_replies"]

#: The `x-nexus-channel` Envoy sets on a Connect call (the channel Lua filter).
CONNECT_CHANNEL = "connect"

_CONNECT_LUA = """\
local function is_connect_unary(headers)
  local ctype = headers:get("content-type") or ""
  if headers:get("connect-protocol-version") ~= nil then
    return string.sub(ctype, 1, 20) ~= "application/connect+"
  end
  return headers:get(":method") == "GET"
    and string.find(headers:get(":path") or "", "[?&]connect=v1") ~= nil
end

local function is_json_codec(headers)
  local ctype = headers:get("content-type") or ""
  if string.sub(ctype, 1, 25) == "application/connect+json" then return true end
  if headers:get("connect-protocol-version") ~= nil
      and string.sub(ctype, 1, 16) == "application/json" then
    return true
  end
  return headers:get(":method") == "GET"
    and string.find(headers:get(":path") or "", "[?&]connect=v1") ~= nil
    and string.find(headers:get(":path") or "", "[?&]encoding=json") ~= nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local meta = handle:streamInfo():dynamicMetadata()
  if is_connect_unary(headers) then
    meta:set("nexus.connect", "unary", true)
  elseif string.sub(headers:get("content-type") or "", 1, 20) == "application/connect+" then
    meta:set("nexus.connect", "stream", true)
  end
  if is_json_codec(headers) then
    meta:set("nexus.connect", "json", true)
  end
end

local function named_details(json)
  return string.gsub(json, '"type":"type%.googleapis%.com/', '"type":"')
end

-- A stream's end message (flags 0x02) arrives as a chunk of its own: rewritten there,
-- its length prefix with it. Message chunks pass as they come.
local function rewrite_end_message(chunk)
  local n = chunk:length()
  if n < 5 then return end
  local head = chunk:getBytes(0, 5)
  if string.byte(head, 1) ~= 2 then return end
  local b2, b3, b4, b5 = string.byte(head, 2, 5)
  if ((b2 * 256 + b3) * 256 + b4) * 256 + b5 ~= n - 5 then return end
  local json, count = named_details(chunk:getBytes(5, n - 5))
  if count == 0 then return end
  local m = #json
  chunk:setBytes(string.char(2, math.floor(m / 16777216) % 256, math.floor(m / 65536) % 256,
    math.floor(m / 256) % 256, m % 256) .. json)
end

-- The server answers a JSON request in JSON; the bridge labels it as it labels every
-- answer of a gRPC server, protobuf.
local JSON_TYPES = {
  ["application/proto"] = "application/json",
  ["application/connect+proto"] = "application/connect+json",
}

function envoy_on_response(handle)
  local marked = handle:streamInfo():dynamicMetadata():get("nexus.connect")
  if marked == nil then return end
  if marked["json"] then
    local json_type = JSON_TYPES[handle:headers():get("content-type") or ""]
    if json_type ~= nil then handle:headers():replace("content-type", json_type) end
  end
  if marked["stream"] then
    for chunk in handle:bodyChunks() do rewrite_end_message(chunk) end
    return
  end
  local headers = handle:headers()
  if headers:get(":status") == "200" then return end
  if string.sub(headers:get("content-type") or "", 1, 16) ~= "application/json" then return end
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  local named, count = named_details(body:getBytes(0, body:length()))
  if count > 0 then body:setBytes(named) end
end
"""


def connect_filters() -> list[dict[str, Any]]:
    """The HTTP filters for Connect, in order: ours (labels JSON answers as JSON, names
    the details of errors: it must come before the bridge to see its responses), then
    the bridge. They come before the buffer filter, so that the buffer's replies to a
    Connect call are seen as replies to a Connect call (`connect_local_replies`)."""
    return [
        {
            "name": "nexus.connect",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": _CONNECT_LUA},
            },
        },
        {
            "name": "envoy.filters.http.connect_grpc_bridge",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                "connect_grpc_bridge.v3.FilterConfig"
            },
        },
    ]


def connect_code(code: grpc.StatusCode) -> str:
    """Connect's name of a gRPC code (`not_found`; `canceled` with one l)."""
    return "canceled" if code is grpc.StatusCode.CANCELLED else code.name.lower()


def _error_info(reason: str) -> str:
    """A gateway ErrorInfo of `reason`, as a Connect error detail's base64 value."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"source": "gateway"})
    return base64.b64encode(info.SerializeToString()).decode()


def _error(reason: str) -> dict[str, Any]:
    return {
        "code": connect_code(code_of(reason)),
        "message": "%LOCAL_REPLY_BODY%",
        "details": [{"type": "google.rpc.ErrorInfo", "value": _error_info(reason)}],
    }


_CONNECT_CALL: dict[str, Any] = {
    "header_filter": {
        "header": {"name": "x-nexus-channel", "string_match": {"exact": CONNECT_CHANNEL}}
    }
}


def connect_local_replies(reasons: Mapping[int, str], other: str) -> list[dict[str, Any]]:
    """Local reply mappers making Envoy's own replies to Connect calls Connect error JSON
    (the HTTP status kept), with the code and ErrorInfo reason of `reasons` (by HTTP
    status; `other` for any other status). Once bridged, a Connect request looks like a
    gRPC one: these must come before the mappers of gRPC requests."""
    mappers: list[dict[str, Any]] = []
    for status, reason in sorted(reasons.items()):
        is_status = {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": status, "runtime_key": f"nexus.cr_{status}"},
                }
            }
        }
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_CONNECT_CALL, is_status]}},
                "body_format_override": {
                    "json_format": _error(reason),
                    "content_type": "application/json",
                },
            }
        )
    mappers.append(
        {
            "filter": _CONNECT_CALL,
            "body_format_override": {
                "json_format": _error(other),
                "content_type": "application/json",
            },
        }
    )
    return mappers
