"""MongoDB-style filters compiled to SQLAlchemy expressions.

Field names are looked up in the model (never interpolated) and every value is checked
against the field's type and passed as a bound parameter, so no SQL text is ever built
from what a caller sends.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Double, Table, and_, cast, false, not_, or_, true

from ._errors import ValidationError
from ._model import FieldInfo, ModelInfo
from ._values import clean, clean_any, short

__all__ = [
    "MAX_FILTER_BRANCHES",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_OPERANDS",
    "OPERATORS",
    "FilterCompiler",
    "Shape",
    "Truth",
]

#: Nesting levels of a filter: the filter object is level 1, and each `$and`/`$or`/`$not`
#: (top level or per field) and each field's operator object adds one. Well below the
#: nesting limit of protobuf's decoder (100) for a filter sent as a Struct, where a level
#: costs two or three message levels, so the limit is ours on every channel.
MAX_FILTER_DEPTH = 16
#: Operands in a whole filter: each comparison counts one, each `$in`/`$nin` value one.
#: Bounds the bound parameters (PostgreSQL takes at most 32,767 a statement).
MAX_FILTER_OPERANDS = 1000
#: Filters in one `$and` or `$or` list (SQLite bounds an expression's depth at 1,000).
MAX_FILTER_BRANCHES = 100

_TOO_DEEP = f"a filter may be nested at most {MAX_FILTER_DEPTH} levels"

#: A filter's shape: its structure, fields and operators without the values (nested
#: tuples, hashable). Leaves: ``(op, field)`` for one value, ``("$in"|"$nin", field, n)``
#: for n values, ``("$null", field, is_null)`` for none; nodes: ``("$and"|"$or",
#: (shape, ...))`` and ``("$not", shape)``.
Shape = tuple[Any, ...]
_ALL: Shape = ("$and", ())

#: What a filter matches by its shape alone: every record (True), none (False), or it
#: depends on the data (None).
Truth = bool | None

#: Every operator a filter may use.
OPERATORS = (
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$like",
    "$ilike",
    "$null",
    "$and",
    "$or",
    "$not",
)
_LOGICAL = ("$and", "$or", "$not")
_FIELD_OPS = frozenset(OPERATORS) - {"$and", "$or"}
_RANGE = frozenset({"$gt", "$gte", "$lt", "$lte"})
_ORDERED_TYPES = (str, int, float, decimal.Decimal)
#: Types whose values need no conversion when of exactly the type (`_value`).
_EXACT = (str, int, float, bool)


class _Budget:
    """Operands left while compiling one filter."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_FILTER_OPERANDS

    def take(self, n: int, path: str) -> None:
        self.left -= n
        if self.left < 0:
            raise ValidationError(
                path, f"a filter may have at most {MAX_FILTER_OPERANDS} operands (values)"
            )


def _and(truths: list[Truth]) -> Truth:
    if any(t is False for t in truths):
        return False
    return True if all(t is True for t in truths) else None


def _or(truths: list[Truth]) -> Truth:
    if any(t is True for t in truths):
        return True
    return False if all(t is False for t in truths) else None


def _not(truth: Truth) -> Truth:
    return None if truth is None else not truth


def _key(key: Any) -> str:
    """A filter key as it may appear in an error's field path (cut when long)."""
    return key if isinstance(key, str) and len(key) <= 60 else short(key)


class FilterCompiler:
    """Compiles filters for one model's table on one database."""

    def __init__(self, model: ModelInfo, table: Table, dialect: str) -> None:
        self.model = model
        self.table = table
        self.fields = model.field_map
        self.dialect = dialect

    def casts(self, f: FieldInfo) -> bool:
        """Whether `f` is compared as REAL (an exact decimal on SQLite, stored as text):
        its filter values are floats, passed to the driver as they are."""
        return self.dialect == "sqlite" and f.base_type is decimal.Decimal

    def column(self, f: FieldInfo) -> tuple[ColumnElement[Any], Callable[[Any], Any]]:
        """The expression to compare/sort a field by, and how to convert a value for it.

        SQLite stores exact decimals as text, so they compare as REAL there.
        """
        col: ColumnElement[Any] = self.table.c[f.name]
        if self.casts(f):
            return cast(col, Double()), float
        return col, _same

    def field(self, name: Any, where: str) -> FieldInfo:
        """The named field, or ValidationError naming it."""
        f = self.fields.get(name) if isinstance(name, str) else None
        if f is None:
            known = ", ".join(self.fields)
            raise ValidationError(f"{where}", f"unknown field {short(name)} (fields: {known})")
        return f

    def compile(self, flt: Mapping[str, Any] | None, where: str = "filter") -> ColumnElement[bool]:
        """The WHERE expression for `flt` (``true()`` for an empty filter)."""
        return self.compile_folded(flt, where)[0]

    def compile_folded(
        self, flt: Mapping[str, Any] | None, where: str = "filter"
    ) -> tuple[ColumnElement[bool], Truth]:
        """The WHERE expression for `flt`, and what it matches by its shape alone
        (`Truth`): the bulk-write guard refuses a filter that matches every record by
        construction, however it is spelled (``{}``, ``{"$and": []}``,
        ``{"$not": {"$or": []}}``, ``{"id": {"$nin": []}}``...).

        Every limit (`MAX_FILTER_DEPTH`, `MAX_FILTER_OPERANDS`, `MAX_FILTER_BRANCHES`) is
        checked here, before any SQL is built: an empty ``$or`` matches nothing, an empty
        ``$and`` everything.
        """
        shape, values, truth = self.shape(flt, where)
        it = iter(values)
        return self.expr(shape, lambda _f: next(it)), truth

    def shape(
        self, flt: Mapping[str, Any] | None, where: str = "filter"
    ) -> tuple[Shape, list[Any], Truth]:
        """`flt` checked and split into its shape (structure, fields and operators: a
        hashable key for compiled SQL) and its values (checked and converted for the
        comparison, in the order `expr` binds them), and its `Truth`.

        Raises:
            ValidationError: naming the field path and the reason.
        """
        values: list[Any] = []
        if flt is None:
            return _ALL, values, True
        shape, truth = self._walk(flt, where, 1, _Budget(), values)
        return shape, values, truth

    def expr(self, shape: Shape, bind: Callable[[FieldInfo], Any]) -> ColumnElement[bool]:
        """The WHERE expression of `shape`; `bind(field)` gives each value's operand in
        turn (the value itself, or a bound parameter to compile SQL once per shape)."""
        kind = shape[0]
        if kind == "$and":
            return and_(true(), *[self.expr(s, bind) for s in shape[1]])
        if kind == "$or":
            return or_(false(), *[self.expr(s, bind) for s in shape[1]])
        if kind == "$not":
            return not_(self.expr(shape[1], bind))
        f = self.fields[shape[1]]
        raw = self.table.c[f.name]
        if kind == "$null":
            return raw.is_(None) if shape[2] else raw.is_not(None)
        col, _ = self.column(f)
        e: ColumnElement[bool]
        if kind == "$eq":
            e = col == bind(f)
        elif kind == "$ne":
            e = or_(col != bind(f), raw.is_(None))
        elif kind == "$in":
            e = col.in_([bind(f) for _ in range(shape[2])])
        elif kind == "$nin":
            e = or_(col.not_in([bind(f) for _ in range(shape[2])]), raw.is_(None))
        elif kind == "$gt":
            e = col > bind(f)
        elif kind == "$gte":
            e = col >= bind(f)
        elif kind == "$lt":
            e = col < bind(f)
        elif kind == "$lte":
            e = col <= bind(f)
        elif kind == "$like":
            e = raw.like(bind(f))
        else:
            e = raw.ilike(bind(f))
        return e

    def _walk(
        self, flt: Any, where: str, depth: int, budget: _Budget, out: list[Any]
    ) -> tuple[Shape, Truth]:
        if not isinstance(flt, Mapping):
            raise ValidationError(where, f"a filter must be an object, got {type(flt).__name__}")
        if depth > MAX_FILTER_DEPTH:
            raise ValidationError(where, _TOO_DEEP)
        parts: list[Shape] = []
        truths: list[Truth] = []
        for key, value in flt.items():
            path = f"{where}.{_key(key)}"
            if isinstance(key, str) and key.startswith("$"):
                if key in ("$and", "$or"):
                    if not isinstance(value, list | tuple):
                        raise ValidationError(path, "expects a list of filters")
                    if len(value) > MAX_FILTER_BRANCHES:
                        raise ValidationError(
                            path, f"at most {MAX_FILTER_BRANCHES} filters, got {len(value)}"
                        )
                    subs = [
                        self._walk(v, f"{path}[{i}]", depth + 1, budget, out)
                        for i, v in enumerate(value)
                    ]
                    parts.append((key, tuple(s for s, _ in subs)))
                    sub_truths = [t for _, t in subs]
                    truths.append(_and(sub_truths) if key == "$and" else _or(sub_truths))
                elif key == "$not":
                    sub, truth = self._walk(value, path, depth + 1, budget, out)
                    parts.append(("$not", sub))
                    truths.append(_not(truth))
                else:
                    raise ValidationError(
                        path,
                        f"unknown operator {short(key)} at the top level (use "
                        f"{', '.join(_LOGICAL)} or a field name)",
                    )
                continue
            f = self.field(key, path)
            sub, truth = self._field(f, value, path, depth, budget, out)
            parts.append(sub)
            truths.append(truth)
        return ("$and", tuple(parts)), _and(truths)

    def _field(
        self, f: FieldInfo, value: Any, path: str, depth: int, budget: _Budget, out: list[Any]
    ) -> tuple[Shape, Truth]:
        if (type(value) is dict or isinstance(value, Mapping)) and any(
            isinstance(k, str) and k.startswith("$") for k in value
        ):
            if depth + 1 > MAX_FILTER_DEPTH:
                raise ValidationError(path, _TOO_DEEP)
            ops = [
                self._op(f, op, v, f"{path}.{_key(op)}", depth + 1, budget, out)
                for op, v in value.items()
            ]
            return ("$and", tuple(s for s, _ in ops)), _and([t for _, t in ops])
        return self._op(f, "$eq", value, path, depth, budget, out)

    def _value(self, f: FieldInfo, value: Any, path: str) -> Any:
        try:
            if type(value) is f.base_type and f.base_type in _EXACT:
                return clean_any(value)  # already of the type: only the value rule
            return clean(f.base_type, value)
        except TypeError as exc:
            raise ValidationError(
                path, f"{exc} (field {f.name} is {f.base_type.__name__})"
            ) from None

    def _op(
        self,
        f: FieldInfo,
        op: Any,
        value: Any,
        path: str,
        depth: int,
        budget: _Budget,
        out: list[Any],
    ) -> tuple[Shape, Truth]:
        if op not in _FIELD_OPS:
            raise ValidationError(
                path,
                f"unknown operator {short(op)} (operators: {', '.join(sorted(_FIELD_OPS))})",
            )
        conv = float if self.casts(f) else _same
        bt = f.base_type
        name = f.name
        # a NULL test on a field that cannot be null has a known answer
        never_null = not f.nullable
        if op == "$null":
            if not isinstance(value, bool):
                raise ValidationError(path, "$null expects true or false")
            budget.take(1, path)
            return ("$null", name, value), ((not value) if never_null else None)
        if op == "$not":
            sub, truth = self._field(f, value, path, depth + 1, budget, out)
            return ("$not", sub), _not(truth)
        if bt in (dict, list):
            raise ValidationError(path, f"{op} is not supported on {bt.__name__} (JSON) fields")
        if op in ("$eq", "$ne"):
            budget.take(1, path)
            if value is None:
                is_eq = op == "$eq"
                return ("$null", name, is_eq), ((not is_eq) if never_null else None)
            out.append(conv(self._value(f, value, path)))
            return (op, name), None
        if op in ("$in", "$nin"):
            if not isinstance(value, list | tuple):
                raise ValidationError(path, f"{op} expects a list")
            budget.take(len(value), path)  # before looking at any value
            vals = [conv(self._value(f, v, f"{path}[{i}]")) for i, v in enumerate(value)]
            if vals:
                # the last value repeated up to a power of two: the same set, and lists
                # of 5 to 8 values share one shape (one compiled statement), not four
                vals += [vals[-1]] * (_bucket(len(vals)) - len(vals))
            out.extend(vals)
            if op == "$in":
                return ("$in", name, len(vals)), (False if not vals else None)
            return ("$nin", name, len(vals)), (True if not vals else None)
        if op in _RANGE:
            if not (bt in _ORDERED_TYPES or _is_temporal(bt)):
                raise ValidationError(
                    path, f"{op} is not supported on {bt.__name__} fields (not ordered)"
                )
            budget.take(1, path)
            out.append(conv(self._value(f, value, path)))
            return (op, name), None
        # $like / $ilike
        if bt is not str:
            raise ValidationError(path, f"{op} is only supported on str fields")
        if not isinstance(value, str):
            raise ValidationError(path, f"{op} expects a str pattern")
        budget.take(1, path)
        out.append(self._value(f, value, path))
        return (op, name), None


def _bucket(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _is_temporal(tp: Any) -> bool:
    import datetime as dt

    return tp in (dt.datetime, dt.date)


def _same(v: Any) -> Any:
    return v
