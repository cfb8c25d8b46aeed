"""A protobuf fuzzer over every RPC the running server exposes (issue 14, sections 1 and 5).

The methods come from the server itself (server reflection, with the default pool for
services whose descriptors reflection cannot send), so an RPC added later, or a typed
per-model service, is fuzzed without touching this file. For each method a seeded
generator (`random.Random(SEED)`: the same cases on every run) makes about
`CASES_PER_METHOD` requests:

- valid requests built from the method's fields (known names get meaningful values:
  existing ids, a real model, a real workflow...);
- the same with one field set to a hostile value of its type (boundary and out-of-range
  ints, NaN/Inf, Timestamps out of range or with bad nanos, strings with NUL or of
  10,000 characters, invalid enum numbers, forged page tokens, wrong field masks...);
- filters and records from `_values.py` (`$in` with 40,000 values, `$or` with 1,001
  branches, unknown operators, nesting deeper than any limit, NaN, overflowing dates,
  out-of-range Decimals, ids that exhaust a sequence...), cycled so that every one of
  them is sent on each database;
- every field hostile at once;
- raw bytes sent without serializers: truncated messages, invalid UTF-8 in a string
  field, nesting beyond the decoder's limit, an impossible length, garbage.

Every answer must hold the rules for a client's mistake: never INTERNAL, UNKNOWN,
UNAVAILABLE or DATA_LOSS, never a deadline (a stall), a message that passes
`_rules.message_problems`, and from our services a `google.rpc.Status` with an
ErrorInfo of domain "nexus" (with a BadRequest field violation for INVALID_ARGUMENT).
After the run the server still answers health with SERVING and ordinary calls succeed.
The test collects every failure, prints the deduplicated list and fails with it; it
never stops at the first one.
"""

from __future__ import annotations

import base64
import json
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pool, json_format, message, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from tests.fuzz._rules import message_problems
from tests.fuzz._values import HOSTILE_FILTERS, HOSTILE_NUMBERS, HOSTILE_RECORDS, HOSTILE_STRINGS

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

SEED = 14
#: Cases per method: ~50 methods make ~1,500 calls per database.
CASES_PER_METHOD = 30
#: The fuzzing stops here (and says so) whatever it has left; each database's run is
#: bounded by this plus the slowest call.
TIME_BUDGET = 55.0
#: One call's deadline: a call that takes longer counts as a stall.
CALL_TIMEOUT = 10.0
#: Calls slower than this are listed in the summary (not a failure by themselves).
SLOW = 1.0
BAD_CODES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}
T = descriptor.FieldDescriptor
MODELS = ("Gadget", "Counter")
WORKFLOWS = ("create_gadget", "list_gadgets", "bump")

# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Method:
    """One RPC of the running server, with the descriptor of its request."""

    service: str
    name: str
    input: descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def ours(self) -> bool:
        """One of our services (held to the ErrorInfo rule), not health or reflection."""
        return self.service.startswith("nexus.")

    @property
    def model(self) -> str | None:
        """The model of a typed per-model service."""
        m = re.fullmatch(r"nexus\.models\.v1\.(\w+)Service", self.service)
        return m.group(1) if m else None


def discover(address: str) -> tuple[list[Method], list[str]]:
    """Every method of every service the server lists through reflection, and the
    services whose descriptors reflection could not send (found in the default pool)."""
    methods: list[Method] = []
    not_reflected: list[str] = []
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        for service in sorted(database.get_services()):
            try:
                desc = pool.FindServiceByName(service)
            except KeyError:
                not_reflected.append(service)
                desc = descriptor_pool.Default().FindServiceByName(service)
            for m in desc.methods:
                methods.append(
                    Method(service, m.name, m.input_type, m.client_streaming, m.server_streaming)
                )
    return methods, not_reflected


# --------------------------------------------------------------------------- state


@dataclass
class World:
    """What exists on the server: ids to aim valid requests at."""

    ids: dict[str, list[Any]] = field(default_factory=lambda: {m: [] for m in MODELS})
    executions: list[str] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    serial: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{next(self.serial)}"


def _cls(desc: descriptor.Descriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(desc)


def valid_record(model: str, world: World) -> dict[str, Any]:
    """A record of `model` that the server accepts (as proto3 JSON)."""
    if model == "Counter":
        return {"label": world.unique("c"), "value": 3}
    return {
        "name": world.unique("g"),
        "count": 1,
        "ratio": 0.5,
        "active": True,
        "blob": base64.b64encode(b"\x00\x01").decode(),
        "price": "1.25",
        "seen_at": "2024-01-02T03:04:05Z",
        "born_on": "2024-01-02",
        "token": str(uuid.UUID(int=next(world.serial))),
        "color": "red",
        "meta": {"a": 1},
        "tags": [1, "b"],
    }


def _first_field(model: str) -> str:
    return "label" if model == "Counter" else "name"


def _num_field(model: str) -> str:
    return "value" if model == "Counter" else "count"


def base_json(method: Method, model: str, world: World, rng: random.Random) -> dict[str, Any]:
    """A valid request of `method` as proto3 JSON (fields it does not know stay unset)."""
    doc: dict[str, Any] = {}
    ids = world.ids[model]
    for f in method.input.fields:
        n = f.name
        msg_type = f.message_type.full_name if f.message_type else ""
        if n == "model":
            doc[n] = model
        elif n == "name" and method.service.endswith("WorkflowService"):
            if method.name == "RegisterWorkflow":
                doc[n] = world.unique("fz_wf")
            elif method.name == "DeleteWorkflow":
                doc[n] = world.unique("fz_gone")
            else:
                doc[n] = rng.choice(WORKFLOWS)
        elif n == "name" and method.name == "GetModel":
            doc[n] = model
        elif n == "id" and method.service.endswith("WorkflowService"):
            if world.executions:
                doc[n] = rng.choice(world.executions)
        elif n == "id" and ids:
            doc[n] = rng.choice(ids)
        elif n in ("record",):
            doc[n] = valid_record(model, world)
        elif n == "values":
            doc[n] = {_num_field(model): 2}
        elif n == "records" and msg_type == "google.protobuf.Struct":
            doc[n] = [valid_record(model, world) for _ in range(2)]
        elif n == "filter":
            doc[n] = {_num_field(model): {"$gte": 0}}
        elif n == "order_by":
            doc[n] = rng.choice([_first_field(model), f"-{_num_field(model)}"])
        elif n == "page_size":
            doc[n] = 2
        elif n == "fields":
            doc[n] = ["id", _first_field(model)]
        elif n == "update_mask":
            doc[n] = _num_field(model)
        elif n == "request_id":
            doc[n] = uuid.UUID(int=rng.getrandbits(128)).hex
        elif n == "conflict_on" and model == "Gadget":
            doc[n] = ["name"]
        elif n == "inputs":
            wf = doc.get("name", "create_gadget")
            doc[n] = {"bump": {"label": world.unique("i")}, "list_gadgets": {"limit": 3}}.get(
                wf, {"name": world.unique("i"), "count": 2}
            )
        elif n == "writes":
            doc[n] = [{"create": {"model": model, "record": valid_record(model, world)}}]
        elif n == "definition":
            doc[n] = {
                "description": "fuzz",
                "nodes": [{"id": "c", "type": "GadgetCreateNode", "params": {"name": "{{n}}"}}],
            }
        elif n == "workflow":
            doc[n] = rng.choice(WORKFLOWS)
        elif msg_type.startswith("nexus.models.v1.") and method.model:
            if f.is_repeated:
                doc[n] = [valid_record(method.model, world) for _ in range(2)]
            else:
                rec = valid_record(method.model, world)
                if method.name.startswith("Update") and ids:
                    rec["id"] = rng.choice(ids)
                doc[n] = rec
    return doc


def valid_request(method: Method, model: str, world: World, rng: random.Random) -> message.Message:
    msg = _cls(method.input)()
    json_format.ParseDict(base_json(method, model, world, rng), msg)
    return msg


# --------------------------------------------------------------------------- hostile values

TIMESTAMPS = [
    (253_402_300_800, 0),  # 10000-01-01
    (-62_135_596_801, 0),  # just before 0001-01-01
    (2**63 - 1, 0),
    (-(2**63), 0),
    (0, -1),
    (0, 1_000_000_000),
    (0, 2**31 - 1),
    (0, -(2**31)),
    (-62_135_596_800, 0),  # 0001-01-01: valid
    (253_402_300_799, 999_999_999),  # 9999-12-31T23:59:59.999999999: valid
]
INT64 = [2**63 - 1, -(2**63), -1, 0, 2**31, 2**53 + 1]
INT32 = [2**31 - 1, -(2**31), -1, 0]
MASKS = [[""], ["nosuchfield"], ["id"], ["created_at"], ["a.b.c"], ["x" * 10_000], ["\x00"]]
REQUEST_IDS = ["", "\x00", "a\x00b", "x" * 10_000, "é" * 3_000, "' OR 1=1 --"]


def forged_tokens(world: World) -> list[str]:
    """Page tokens that are not the server's own: forged, deep, of another listing."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    tokens = [
        "not-a-token",
        "!!!!",
        "\x00",
        "x" * 10_000,
        b64(b"[" * 100_000),
        b64(b'{"k":' * 20_000),
        b64(json.dumps({"k": "x", "v": [1]}).encode()),
        b64(json.dumps({"k": [], "v": "x"}).encode()),
        b64(json.dumps({"v": [2**70]}).encode()),
        b64(b"\xff\xfe\xfd"),
    ]
    for real in world.tokens.values():
        tokens.append(real)  # a real token, maybe of another model or filter
        tokens.append(real[:-2] + ("AA" if not real.endswith("AA") else "BB"))  # tampered
        tokens.append(real[: len(real) // 2])
        try:
            body = json.loads(base64.urlsafe_b64decode(real + "=" * (-len(real) % 4)))
            values = body["v"]
        except (ValueError, KeyError, TypeError):
            continue  # not JSON (a signed token): tampering above is all we can do
        for bad in (2**70, -(2**70), "\x00", 1e308, None, [[]], {"b": "!"}):
            tokens.append(b64(json.dumps({**body, "v": [bad] * len(values)}).encode()))
    return tokens


class Cursor:
    """Cycles through a list, so every entry is used once before any is used twice."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.i = 0

    def next(self) -> Any:
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


@dataclass
class Hostile:
    """Picks hostile values; `filters` and `records` cycle over every entry."""

    rng: random.Random
    world: World
    filters: Cursor = field(default_factory=lambda: Cursor(HOSTILE_FILTERS))
    records: Cursor = field(default_factory=lambda: Cursor(HOSTILE_RECORDS))

    def string(self, f: descriptor.FieldDescriptor) -> str:
        if f.name == "page_token":
            return str(self.rng.choice(forged_tokens(self.world)))
        if f.name == "request_id":
            return self.rng.choice(REQUEST_IDS)
        if f.name == "id":
            others = [str(i) for ids in self.world.ids.values() for i in ids[:1]]
            return self.rng.choice([*HOSTILE_STRINGS, *others, *self.world.executions[:1]])
        return self.rng.choice(HOSTILE_STRINGS)

    def scalar(self, f: descriptor.FieldDescriptor) -> Any:
        t = f.type
        if t in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64):
            return self.rng.choice(INT64)
        if t in (T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32):
            return self.rng.choice(INT32)
        if t in (T.TYPE_UINT32, T.TYPE_FIXED32):
            return self.rng.choice([0, 2**32 - 1])
        if t in (T.TYPE_UINT64, T.TYPE_FIXED64):
            return self.rng.choice([0, 2**64 - 1])
        if t in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
            return self.rng.choice(HOSTILE_NUMBERS)
        if t == T.TYPE_BOOL:
            return self.rng.choice([True, False])
        if t == T.TYPE_ENUM:
            return self.rng.choice([99, -1, 2**31 - 1, 0])
        if t == T.TYPE_BYTES:
            return self.rng.choice([b"", b"\x00" * 16, self.rng.randbytes(64), b"\xff" * 100_000])
        return self.string(f)

    def document(self, f: descriptor.FieldDescriptor) -> dict[str, Any]:
        """A hostile Struct for field `f`: a filter, a record or any JSON."""
        if f.name == "filter":
            return dict(self.filters.next())
        return dict(self.records.next())

    def set(self, msg: message.Message, f: descriptor.FieldDescriptor) -> str:
        """Set field `f` of `msg` to a hostile value; returns what it set (short)."""
        repeated = f.is_repeated
        container: Any = getattr(msg, f.name)
        if f.message_type is None:
            value = self.scalar(f)
            if repeated:
                many = self.rng.random() < 0.3
                container.extend([value] * (10_000 if many else 1))
                return f"[{_short(value)}]{' x10000' if many else ''}"
            setattr(msg, f.name, value)
            return _short(value)
        if f.message_type.GetOptions().map_entry:
            container[self.string(f.message_type.fields_by_name["key"])]
            return "map entry"
        target: Any = container.add() if repeated else container
        struct = f.message_type.full_name == "google.protobuf.Struct"
        if repeated and struct and self.rng.random() < 0.15:
            rows = [{"label": "r", "name": f"r{i}"} for i in range(12_000)]
            for row in rows[1:]:
                container.add().update(row)
            target.update(rows[0])
            return "12,000 rows"
        return self.fill(target)

    def fill(self, target: Any) -> str:
        """Make the message `target` hostile (well-known types by their meaning)."""
        name = target.DESCRIPTOR.full_name
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            target.seconds, target.nanos = self.rng.choice(TIMESTAMPS)
            if name == "google.protobuf.Duration" and target.seconds < 0 < target.nanos:
                target.nanos = -target.nanos
            return f"{name.rsplit('.', 1)[1]}({target.seconds}, {target.nanos})"
        if name == "google.protobuf.Struct":
            doc = self.document(target.DESCRIPTOR.fields[0])
            if self.rng.random() < 0.5:
                doc = dict(self.filters.next())
            target.update(doc)
            return _short(doc)
        if name == "google.protobuf.ListValue":
            items = self.rng.choice([[float("nan")], ["\x00"], list(range(10_000)), [[[[[]]]]]])
            target.extend(items)
            return _short(items)
        if name == "google.protobuf.Value":
            holder = _cls(_struct_desc())()
            holder.update({"v": self.rng.choice([float("inf"), "\x00", {"$in": 1}, None])})
            target.ParseFromString(holder.fields["v"].SerializeToString())  # another pool
            return _short(json_format.MessageToDict(target))
        if name == "google.protobuf.FieldMask":
            paths = self.rng.choice(MASKS)
            target.paths.extend(paths)
            return f"mask {_short(paths)}"
        fields = list(target.DESCRIPTOR.fields)
        if not fields:
            return "empty message"
        f = self.rng.choice(fields)
        return f"{f.name}={self.set(target, f)}"


def _struct_desc() -> descriptor.Descriptor:
    return descriptor_pool.Default().FindMessageTypeByName("google.protobuf.Struct")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def paths_of(desc: descriptor.Descriptor, depth: int = 2) -> list[tuple[str, ...]]:
    """Field paths to mutate: every field, and those of nested messages of ours."""
    out: list[tuple[str, ...]] = []
    for f in desc.fields:
        out.append((f.name,))
        sub = f.message_type
        if depth > 1 and sub is not None and not sub.full_name.startswith("google."):
            out.extend((f.name, *p) for p in paths_of(sub, depth - 1))
    return out


def mutate(msg: message.Message, path: tuple[str, ...], hostile: Hostile) -> str:
    """Set the field at `path` (through nested messages) to a hostile value."""
    target: Any = msg
    for name in path[:-1]:
        f = target.DESCRIPTOR.fields_by_name[name]
        child = getattr(target, name)
        target = (child[0] if len(child) else child.add()) if f.is_repeated else child
    f = target.DESCRIPTOR.fields_by_name[path[-1]]
    return f"{'.'.join(path)}={hostile.set(target, f)}"


# --------------------------------------------------------------------------- raw bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_struct_bytes(depth: int) -> bytes:
    """A Struct nested `depth` times through `{"a": {"a": ...}}` (fields map entries)."""
    inner = b""
    for _ in range(depth):
        value = _ld(5, inner)  # Value.struct_value
        entry = _ld(1, b"a") + _ld(2, value)  # map entry: key, value
        inner = _ld(1, entry)  # Struct.fields
    return inner


def deep_group_bytes(number: int, depth: int) -> bytes:
    """Unknown groups nested `depth` deep under field `number`."""
    start = _varint(number << 3 | 3)
    end = _varint(number << 3 | 4)
    return start * depth + end * depth


def raw_cases(
    desc: descriptor.Descriptor, valid: bytes, rng: random.Random
) -> list[tuple[str, bytes]]:
    """Malformed encodings of a request of type `desc`."""
    strings = [f for f in desc.fields if f.type == T.TYPE_STRING]
    structs = [
        f
        for f in desc.fields
        if f.message_type is not None and f.message_type.full_name == "google.protobuf.Struct"
    ]
    cases: list[tuple[str, bytes]] = []
    if len(valid) > 1:
        cases.append(("truncated", valid[: rng.randrange(1, len(valid))]))
    else:
        cases.append(("truncated", b"\x0a\x05ab"))
    bad_utf8 = b"ok\xff\xfe\xc3\x28"
    if strings:
        f = rng.choice(strings)
        cases.append((f"invalid UTF-8 in {f.name}", valid + _ld(f.number, bad_utf8)))
    else:
        nested = [f for f in desc.fields if f.message_type is not None]
        sub = next(
            ((f, g) for f in nested for g in f.message_type.fields if g.type == T.TYPE_STRING),
            None,
        )
        if sub:
            f, g = sub
            cases.append(
                (f"invalid UTF-8 in {f.name}.{g.name}", _ld(f.number, _ld(g.number, bad_utf8)))
            )
        else:
            cases.append(("invalid UTF-8 (unknown field)", _ld(999, bad_utf8)))
    if structs:
        f = rng.choice(structs)
        cases.append((f"{f.name} nested 150 deep", valid + _ld(f.number, deep_struct_bytes(150))))
    else:
        cases.append(("groups nested 150 deep", valid + deep_group_bytes(999, 150)))
    cases.append(("length beyond the end", valid + _varint(1 << 3 | 2) + _varint(1_000_000) + b"x"))
    cases.append(("garbage", rng.randbytes(rng.randrange(1, 64))))
    number = desc.fields[0].number if desc.fields else 1
    cases.append(("wrong wire type", valid + _varint(number << 3 | 5) + b"\x01\x02\x03\x04"))
    return cases


# --------------------------------------------------------------------------- calls


@dataclass
class Outcome:
    code: grpc.StatusCode
    message: str
    infos: list[error_details_pb2.ErrorInfo]
    violations: list[str]
    replies: list[bytes]


def call(channel: grpc.Channel, method: Method, payload: bytes) -> Outcome:
    """Send `payload` as is (no serializers) and collect the answer."""
    replies: list[bytes] = []
    try:
        if method.client_streaming:
            stream = channel.stream_stream(method.path)(iter([payload]), timeout=CALL_TIMEOUT)
            replies.extend(_take(stream, 1))
            stream.cancel()
        elif method.server_streaming:
            stream = channel.unary_stream(method.path)(payload, timeout=CALL_TIMEOUT)
            limit = 1 if method.name == "Watch" else 10_000
            replies.extend(_take(stream, limit))
            stream.cancel()
        else:
            replies.append(channel.unary_unary(method.path)(payload, timeout=CALL_TIMEOUT))
        return Outcome(grpc.StatusCode.OK, "", [], [], replies)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.CANCELLED and replies:
            return Outcome(grpc.StatusCode.OK, "", [], [], replies)
        infos: list[error_details_pb2.ErrorInfo] = []
        violations: list[str] = []
        try:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except ValueError:
            status = None
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                infos.append(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(v.field for v in bad.field_violations)
        return Outcome(code, err.details() or "", infos, violations, replies)  # type: ignore[attr-defined]


def _take(stream: Any, limit: int) -> list[bytes]:
    out: list[bytes] = []
    for reply in stream:
        out.append(reply)
        if len(out) >= limit:
            break
    return out


def problems_of(method: Method, outcome: Outcome, *, raw: bool) -> list[str]:
    """Why `outcome` breaks the rules for an answer to a client's request."""
    found: list[str] = []
    code = outcome.code
    if code == grpc.StatusCode.OK:
        return found
    if code in BAD_CODES:
        found.append(code.name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        found.append(f"no answer within {CALL_TIMEOUT:.0f} s")
    found.extend(f"message shows {p}" for p in message_problems(outcome.message))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and outcome.message.startswith(
        "SERVER: Received message larger than max"
    ):
        # grpc's transport refuses a request over the server's 4 MiB limit before any
        # handler runs (so no ErrorInfo): the documented answer to an oversized request
        return found
    if method.ours:
        nexus = [i for i in outcome.infos if i.domain == "nexus"]
        if len(nexus) != 1:
            found.append(f"{len(nexus)} ErrorInfo of domain nexus")
        if code == grpc.StatusCode.INVALID_ARGUMENT and not raw and not outcome.violations:
            found.append("INVALID_ARGUMENT without a BadRequest field violation")
    return found


# --------------------------------------------------------------------------- the run


@dataclass
class Failure:
    method: str
    case: str
    code: str
    message: str
    problems: list[str]

    def key(self) -> tuple[str, str, str, str]:
        """What makes two failures the same: the kind of case (the field path, or the
        raw mutation), the code, the message without numbers or type names, and what
        is wrong with it (the method is left out: one cause often fails every method)."""
        kind = re.sub(r"=.*|^\w+: ", "", self.case)
        kind = re.sub(r"\(.*", "", kind)
        text = re.sub(r"'nexus\.[\w.]+'", "<type>", self.message)
        text = re.sub(r"[0-9a-f]{8,}|\d+", "#", text)[:100]
        return kind, self.code, text, "; ".join(self.problems)


@dataclass
class Run:
    channel: grpc.Channel
    world: World
    failures: list[Failure] = field(default_factory=list)
    calls: int = 0
    coverage: dict[str, int] = field(default_factory=dict)
    #: calls slower than `SLOW` seconds: (seconds, method, case, code)
    slow: list[tuple[float, str, str, str]] = field(default_factory=list)
    deadline: float = float("inf")

    @property
    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def send(self, method: Method, case: str, payload: bytes, *, raw: bool = False) -> Outcome:
        started = time.monotonic()
        outcome = call(self.channel, method, payload)
        took = time.monotonic() - started
        if took > SLOW:
            self.slow.append((took, method.path, case[:100], outcome.code.name))
        self.calls += 1
        self.coverage[method.path] = self.coverage.get(method.path, 0) + 1
        problems = problems_of(method, outcome, raw=raw)
        if problems:
            self.failures.append(
                Failure(method.path, case, outcome.code.name, outcome.message[:300], problems)
            )
        return outcome

    def report(self) -> str:
        """The failures, deduplicated (see `Failure.key`), with the methods each hit."""
        groups: dict[tuple[str, str, str, str], list[Failure]] = {}
        for f in self.failures:
            groups.setdefault(f.key(), []).append(f)
        lines = [f"{len(self.failures)} failing calls, {len(groups)} distinct:"]
        for key in sorted(groups, key=lambda k: (k[1], k[0])):
            first = groups[key][0]
            methods = sorted({f.method.rsplit("/", 1)[1] for f in groups[key]})
            shown = ", ".join(methods[:6]) + (f" +{len(methods) - 6}" if len(methods) > 6 else "")
            lines.append(
                f"- {first.code} x{len(groups[key])} [{first.case[:110]}] in {shown}: "
                f"{first.message[:160]!r} ({key[3]})"
            )
        return "\n".join(lines)


def _unary(channel: grpc.Channel, path: str, request: message.Message, reply: type[Any]) -> Any:
    fn: Callable[..., Any] = channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=reply.FromString,
    )
    return fn(request, timeout=CALL_TIMEOUT)


def seed_world(channel: grpc.Channel, methods: list[Method], world: World) -> None:
    """Create a few records and executions to aim valid requests at, and real tokens."""
    rng = random.Random(SEED)
    by_path = {m.path: m for m in methods}
    generic = "/nexus.model.v1.ModelService/"
    for model in MODELS:
        for _ in range(4):
            m = by_path[generic + "CreateRecord"]
            req = valid_request(m, model, world, rng)
            rec = _unary(channel, m.path, req, _cls(_struct_desc()))
            got = json_format.MessageToDict(rec)["id"]
            # a Struct carries numbers as doubles; ids are sent as text (int64 in JSON)
            world.ids[model].append(str(int(got)) if isinstance(got, float) else got)
        m = by_path[generic + "ListRecords"]
        req = valid_request(m, model, world, rng)
        resp = _unary(channel, m.path, req, _cls(_reply_desc(m, "ListRecordsResponse")))
        assert resp.next_page_token, "the seeded listing returned no page token"
        world.tokens[model] = resp.next_page_token
    m = by_path["/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"]
    for wf, inputs in (("create_gadget", {"name": world.unique("e")}), ("list_gadgets", {})):
        req = _cls(m.input)()
        json_format.ParseDict({"name": wf, "inputs": inputs}, req)
        execution = _unary(channel, m.path, req, _cls(_reply_desc(m, "Execution")))
        world.executions.append(execution.id)


def _reply_desc(method: Method, name: str) -> descriptor.Descriptor:
    return method.input.file.pool.FindMessageTypeByName(f"{method.input.file.package}.{name}")


def fuzz_method(run: Run, method: Method, rng: random.Random, hostile: Hostile) -> None:
    """Send `CASES_PER_METHOD` cases to `method`."""
    paths = paths_of(method.input)
    has_doc = any(
        f.message_type is not None
        and f.message_type.full_name == "google.protobuf.Struct"
        and f.name in ("filter", "record", "values", "inputs")
        for f in method.input.fields
    ) or method.name.startswith(("Create", "Upsert", "Update", "Bulk", "Batch"))
    model = method.model or rng.choice(MODELS)
    raw = raw_cases(
        method.input, valid_request(method, model, run.world, rng).SerializeToString(), rng
    )
    for i in range(CASES_PER_METHOD - len(raw)):
        if run.out_of_time:
            return
        model = method.model or rng.choice(MODELS)
        msg = valid_request(method, model, run.world, rng)
        if i < 3:
            case = "valid"
        elif i < 7 and has_doc:
            case = _document_case(msg, method, model, hostile)
        elif i >= CASES_PER_METHOD - len(raw) - 3:
            msg = _cls(method.input)()
            parts = [
                hostile.set(msg, f) and f.name for f in method.input.fields if rng.random() < 0.7
            ]
            case = f"every field hostile ({', '.join(p for p in parts if p)})"
        elif paths:
            case = mutate(msg, rng.choice(paths), hostile)
        else:
            case = "empty request"
        run.send(method, f"{model}: {case}" if not method.model else case, msg.SerializeToString())
    for case, payload in raw:
        if run.out_of_time:
            return
        run.send(method, f"raw: {case}", payload, raw=True)


def _document_case(msg: message.Message, method: Method, model: str, hostile: Hostile) -> str:
    """Put a hostile filter or record into the request's filter/record/values/typed
    record field."""
    fields = method.input.fields_by_name
    if "filter" in fields and (hostile.rng.random() < 0.6 or len(fields) <= 3):
        target: Any = msg.filter
        target.Clear()
        doc = hostile.filters.next()
        target.update(doc)
        return f"filter={_short(doc)}"
    doc = hostile.records.next()
    typed = [
        f.name
        for f in method.input.fields
        if f.message_type and f.message_type.full_name.startswith("nexus.models.")
    ]
    for name in ("record", "values", "inputs", "records", *typed):
        if name in fields:
            holder: Any = getattr(msg, name)
            if fields[name].is_repeated:
                return f"{name}+={_put(holder.add(), doc, hostile)}"
            holder.Clear()
            return f"{name}={_put(holder, doc, hostile)}"
    if "writes" in fields:
        w: Any = msg.writes.add()
        w.create.model = model
        w.create.record.update(doc)
        return f"writes+=create {_short(doc)}"
    return mutate(msg, (method.input.fields[0].name,), hostile)


def _put(target: Any, doc: dict[str, Any], hostile: Hostile) -> str:
    """Put the JSON document `doc` into `target`: a Struct as is, a typed record through
    the proto3 JSON mapping (NaN and Infinity are valid JSON for a double there); what
    the mapping itself refuses becomes a hostile value of the message instead."""
    if target.DESCRIPTOR.full_name == "google.protobuf.Struct":
        target.update(doc)
        return _short(doc)
    try:
        json_format.ParseDict(doc, target, ignore_unknown_fields=True)
    except json_format.ParseError:
        target.Clear()
        return hostile.fill(target)
    return _short(doc)


def after_run_problems(channel: grpc.Channel, methods: list[Method], world: World) -> list[str]:
    """The server still answers health with SERVING, and ordinary calls succeed."""
    problems: list[str] = []
    health = descriptor_pool.Default().FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    try:
        resp = _unary(
            channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(), _cls(health)
        )
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            problems.append(f"health answers {resp.status}")
    except grpc.RpcError as err:
        problems.append(f"health failed: {err.code()} {err.details()}")  # type: ignore[attr-defined]
    rng = random.Random(SEED + 1)
    by_path = {m.path: m for m in methods}
    for path in (
        "/nexus.model.v1.ModelService/ListModels",
        "/nexus.models.v1.GadgetService/CreateGadget",
        "/nexus.models.v1.CounterService/CreateCounter",
        "/nexus.model.v1.ModelService/CreateRecord",
        "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow",
    ):
        m = by_path[path]
        for model in MODELS if m.name == "CreateRecord" else (m.model or "Gadget",):
            req = valid_request(m, model, world, rng)
            try:
                channel.unary_unary(path)(req.SerializeToString(), timeout=CALL_TIMEOUT)
            except grpc.RpcError as err:
                problems.append(
                    f"after the run, a valid {path} ({model}) failed: "
                    f"{err.code().name} {err.details()!r}"  # type: ignore[attr-defined]
                )
    return problems


@pytest.mark.timeout(150)
def test_every_rpc_answers_client_mistakes_as_client_errors(fuzz_server: Any) -> None:
    """~1,500 seeded calls over every method the server lists, on this backend."""
    methods, not_reflected = discover(fuzz_server.address)
    services = {m.service for m in methods}
    # the set comes from the server; these must be among it
    assert {
        "nexus.model.v1.ModelService",
        "nexus.workflow.v1.WorkflowService",
        "nexus.models.v1.GadgetService",
        "nexus.models.v1.CounterService",
        "grpc.health.v1.Health",
    } <= services
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(fuzz_server.address, options=options) as channel:
        world = World()
        seed_world(channel, methods, world)
        run = Run(channel, world)
        rng = random.Random(SEED)
        hostile = Hostile(rng, world)
        started = time.monotonic()
        run.deadline = started + TIME_BUDGET
        for method in methods:
            fuzz_method(run, method, rng, hostile)
        skipped = [m.path for m in methods if run.coverage.get(m.path, 0) < CASES_PER_METHOD]
        elapsed = time.monotonic() - started
        after = after_run_problems(channel, methods, world)
    summary = (
        f"[{fuzz_server.backend}] {run.calls} calls over {len(run.coverage)} methods of "
        f"{len(services)} services in {elapsed:.1f} s ({len(HOSTILE_FILTERS)} hostile filters, "
        f"{len(HOSTILE_RECORDS)} hostile records; sent {hostile.filters.i} and "
        f"{hostile.records.i})"
    )
    print(summary)
    if not_reflected:
        print(f"reflection lists but cannot describe: {', '.join(not_reflected)}")
    if skipped:
        print(f"time budget reached: {len(skipped)} methods not fully fuzzed: {skipped}")
    for took, path, case, code in sorted(run.slow, reverse=True)[:15]:
        print(f"slow: {took:.1f} s {path} [{case}] -> {code}")
    report = run.report()
    print(report)
    for line in after:
        print(line)
    assert hostile.filters.i >= len(HOSTILE_FILTERS), "not every hostile filter was sent"
    assert hostile.records.i >= len(HOSTILE_RECORDS), "not every hostile record was sent"
    assert not skipped, f"the time budget left methods not fully fuzzed: {skipped}"
    assert not run.failures and not after, f"{summary}\n{report}\n" + "\n".join(after)
