"""Hostile values the fuzzers send: strings, numbers, filters and record documents.

Shared by the gRPC and the MCP fuzzers. They target the fuzz app's models (see
conftest.py): `Gadget` (a field of every type) and `Counter` (an `int` id). Every list
is fixed (no randomness here): the fuzzers pick from them with a seeded generator.
None of these values contains what `_rules.message_problems` looks for, so an echo of
the input can never be mistaken for a leak.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "HOSTILE_FILTERS",
    "HOSTILE_NUMBERS",
    "HOSTILE_RECORDS",
    "HOSTILE_STRINGS",
    "deep_filter",
    "deep_json",
]

LONG = "x" * 10_000

HOSTILE_STRINGS: list[str] = [
    "",
    "\x00",
    "a\x00b",
    LONG,
    "é" * 5_000,
    "\U0001f4a5" * 100,
    "' OR '1'='1",
    "%_%",
    " ",
    "\n\t\r",
    "$in",
    "9999-12-31T23:59:59-05:00",
    "0001-01-01T00:00:00+05:00",
    "10000-01-01T00:00:00Z",
    "2024-02-30",
    "1e999999",
    "sNaN",
    "NaN",
    "-Infinity",
    "9223372036854775808",
    "-9223372036854775809",
    "null",
    "{}",
    "\ud7ff\ufffd",
    "name,email",
]

HOSTILE_NUMBERS: list[float] = [
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    1e308,
    5e-324,
    2.0**63,
    -(2.0**63) - 4096,
    2.0**64,
    1.5,
    -1.0,
]


def deep_filter(depth: int) -> dict[str, Any]:
    """`{"$not": {"$not": ... {"count": 1}}}`, `depth` levels deep."""
    doc: dict[str, Any] = {"count": 1}
    for _ in range(depth):
        doc = {"$not": doc}
    return doc


def deep_json(depth: int) -> dict[str, Any]:
    """A JSON document nested `depth` objects deep."""
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


def _and_chain(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"count": 1}
    for _ in range(depth):
        doc = {"$and": [doc, {"count": {"$gte": 0}}]}
    return doc


HOSTILE_FILTERS: list[dict[str, Any]] = [
    {"count": {"$in": list(range(40_000))}},
    {"name": {"$nin": [f"n{i}" for i in range(40_000)]}},
    {"$or": [{"count": i} for i in range(1_001)]},
    {"$and": [{"count": {"$ne": i}} for i in range(1_001)]},
    deep_filter(40),
    deep_filter(200),
    _and_chain(60),
    {"count": {"$gt": 2.0**64}},
    {"count": {"$gt": "9223372036854775808"}},
    {"count": -(2.0**63) - 4096},
    {"count": {"$gt": "abc"}},
    {"count": {"$foo": 1}},
    {"$foo": []},
    {"nosuchfield": 1},
    {"name": {"$like": 5}},
    {"name": "a\x00b"},
    {"name": {"$in": ["ok", "a\x00b"]}},
    {"seen_at": {"$gt": "9999-12-31T23:59:59-05:00"}},
    {"seen_at": "0001-01-01T00:00:00+05:00"},
    {"created_at": {"$lt": "0001-01-01T00:00:00+05:00"}},
    {"created_at": {"$lt": "not a date"}},
    {"price": {"$gt": "1e999999"}},
    {"price": "sNaN"},
    {"price": {"$lt": "NaN"}},
    {"ratio": {"$gt": math.nan}},
    {"ratio": math.inf},
    {"$not": {"$or": []}},
    {"$or": []},
    {"$and": []},
    {"name": {"$in": "notalist"}},
    {"name": {"$null": "yes"}},
    {"meta": {"$eq": {"a": 1}}},
    {"meta": {"$gt": 1}},
    {"token": "not-a-uuid"},
    {"born_on": "2024-02-30"},
    {"born_on": {"$gt": "99999-01-01"}},
    {"color": "purple"},
    {"id": {"$in": [None, 1, "x"]}},
    {"count": True},
    {"$and": {"x": 1}},
    {"$or": "x"},
    {"": 1},
    {LONG: 1},
    {"name": LONG},
    {"name": {"$ilike": "%" * 5_000}},
    {"blob": "not base64 !"},
    {"count": {"$in": []}},
    {"count": {"$gte": 0, "$lt": 10, "$ne": 3}},
]

HOSTILE_RECORDS: list[dict[str, Any]] = [
    {"name": "nan", "ratio": math.nan},
    {"name": "inf", "ratio": math.inf},
    {"name": "-inf", "ratio": -math.inf},
    {"name": "dec-huge", "price": "1e999999"},
    {"name": "dec-snan", "price": "sNaN"},
    {"name": "dec-nan", "price": "NaN"},
    {"name": "dec-inf", "price": "Infinity"},
    {"name": "dec-num", "price": math.nan},
    {"name": "late", "seen_at": "9999-12-31T23:59:59-05:00"},
    {"name": "early", "seen_at": "0001-01-01T00:00:00+05:00"},
    {"name": "year-0", "seen_at": "0000-01-01T00:00:00Z"},
    {"name": "big", "count": 2.0**64},
    {"name": "big-text", "count": "9223372036854775808"},
    {"name": "frac", "count": 1.5},
    {"name": "a\x00b"},
    {"name": "json-nul", "meta": {"k": "\x00"}},
    {"name": "json-nul-key", "meta": {"\x00": 1}},
    {"name": "json-deep", "meta": deep_json(90)},
    {"name": "json-nan", "tags": [math.nan]},
    {"name": "empty-id", "id": ""},
    {"name": "long-id", "id": LONG},
    {"name": "nul-id", "id": "a\x00b"},
    {"name": "stamp", "created_at": "2020-01-01T00:00:00Z"},
    {"name": "unknown", "unknown": 1},
    {"name": "blob", "blob": "not base64 !"},
    {"name": "uuid", "token": "zz"},
    {"name": "enum", "color": "purple"},
    {"name": "date", "born_on": "0000-01-01"},
    {"name": "bool", "active": "yes"},
    {"name": LONG},
    {"name": None},
    {},
    {"label": "max-id", "id": 9_223_372_036_854_775_807},
    {"label": "neg-id", "id": -1},
    {"label": "zero-id", "id": 0},
    {"label": "text-id", "id": "abc"},
    {"label": "empty-id", "id": ""},
    {"label": "frac-id", "id": 1.5},
    {"label": "huge-id", "id": 2.0**70},
    {"label": "big", "value": 2.0**63},
    {"label": "nan", "value": math.nan},
]
