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
from ._values import clean, short

__all__ = [
    "MAX_FILTER_BRANCHES",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_OPERANDS",
    "OPERATORS",
    "FilterCompiler",
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

    def column(self, f: FieldInfo) -> tuple[ColumnElement[Any], Callable[[Any], Any]]:
        """The expression to compare/sort a field by, and how to convert a value for it.

        SQLite stores exact decimals as text, so they compare as REAL there.
        """
        col: ColumnElement[Any] = self.table.c[f.name]
        if self.dialect == "sqlite" and f.base_type is decimal.Decimal:
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
        if flt is None:
            return true(), True
        return self._compile(flt, where, 1, _Budget())

    def _compile(
        self, flt: Any, where: str, depth: int, budget: _Budget
    ) -> tuple[ColumnElement[bool], Truth]:
        if not isinstance(flt, Mapping):
            raise ValidationError(where, f"a filter must be an object, got {type(flt).__name__}")
        if depth > MAX_FILTER_DEPTH:
            raise ValidationError(where, _TOO_DEEP)
        parts: list[ColumnElement[bool]] = []
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
                        self._compile(v, f"{path}[{i}]", depth + 1, budget)
                        for i, v in enumerate(value)
                    ]
                    exprs = [e for e, _ in subs]
                    if key == "$and":
                        parts.append(and_(true(), *exprs))
                        truths.append(_and([t for _, t in subs]))
                    else:
                        parts.append(or_(false(), *exprs))
                        truths.append(_or([t for _, t in subs]))
                elif key == "$not":
                    expr, truth = self._compile(value, path, depth + 1, budget)
                    parts.append(not_(expr))
                    truths.append(_not(truth))
                else:
                    raise ValidationError(
                        path,
                        f"unknown operator {short(key)} at the top level (use "
                        f"{', '.join(_LOGICAL)} or a field name)",
                    )
                continue
            f = self.field(key, path)
            expr, truth = self._field_expr(f, value, path, depth, budget)
            parts.append(expr)
            truths.append(truth)
        return (and_(true(), *parts) if parts else true()), _and(truths)

    def _field_expr(
        self, f: FieldInfo, value: Any, path: str, depth: int, budget: _Budget
    ) -> tuple[ColumnElement[bool], Truth]:
        if isinstance(value, Mapping) and any(
            isinstance(k, str) and k.startswith("$") for k in value
        ):
            if depth + 1 > MAX_FILTER_DEPTH:
                raise ValidationError(path, _TOO_DEEP)
            ops = [
                self._op(f, op, v, f"{path}.{_key(op)}", depth + 1, budget)
                for op, v in value.items()
            ]
            return and_(true(), *(e for e, _ in ops)), _and([t for _, t in ops])
        return self._op(f, "$eq", value, path, depth, budget)

    def _value(self, f: FieldInfo, value: Any, path: str) -> Any:
        try:
            return clean(f.base_type, value)
        except TypeError as exc:
            raise ValidationError(
                path, f"{exc} (field {f.name} is {f.base_type.__name__})"
            ) from None

    def _op(
        self, f: FieldInfo, op: Any, value: Any, path: str, depth: int, budget: _Budget
    ) -> tuple[ColumnElement[bool], Truth]:
        if op not in _FIELD_OPS:
            raise ValidationError(
                path,
                f"unknown operator {short(op)} (operators: {', '.join(sorted(_FIELD_OPS))})",
            )
        col, conv = self.column(f)
        bt = f.base_type
        raw = self.table.c[f.name]
        # a NULL test on a field that cannot be null has a known answer
        never_null = not f.nullable
        if op == "$null":
            if not isinstance(value, bool):
                raise ValidationError(path, "$null expects true or false")
            budget.take(1, path)
            return (raw.is_(None) if value else raw.is_not(None)), (
                (not value) if never_null else None
            )
        if op == "$not":
            expr, truth = self._field_expr(f, value, path, depth + 1, budget)
            return not_(expr), _not(truth)
        if bt in (dict, list):
            raise ValidationError(path, f"{op} is not supported on {bt.__name__} (JSON) fields")
        if op in ("$eq", "$ne"):
            budget.take(1, path)
            if value is None:
                is_eq = op == "$eq"
                return (raw.is_(None) if is_eq else raw.is_not(None)), (
                    (not is_eq) if never_null else None
                )
            v = conv(self._value(f, value, path))
            if op == "$eq":
                return col == v, None
            return or_(col != v, raw.is_(None)), None
        if op in ("$in", "$nin"):
            if not isinstance(value, list | tuple):
                raise ValidationError(path, f"{op} expects a list")
            budget.take(len(value), path)  # before looking at any value
            vals = [conv(self._value(f, v, f"{path}[{i}]")) for i, v in enumerate(value)]
            if op == "$in":
                return col.in_(vals), (False if not vals else None)
            return or_(col.not_in(vals), raw.is_(None)), (True if not vals else None)
        if op in _RANGE:
            if not (bt in _ORDERED_TYPES or _is_temporal(bt)):
                raise ValidationError(
                    path, f"{op} is not supported on {bt.__name__} fields (not ordered)"
                )
            budget.take(1, path)
            v = conv(self._value(f, value, path))
            if op == "$gt":
                return col > v, None
            if op == "$gte":
                return col >= v, None
            if op == "$lt":
                return col < v, None
            return col <= v, None
        # $like / $ilike
        if bt is not str:
            raise ValidationError(path, f"{op} is only supported on str fields")
        if not isinstance(value, str):
            raise ValidationError(path, f"{op} expects a str pattern")
        budget.take(1, path)
        v = self._value(f, value, path)
        return (raw.like(v) if op == "$like" else raw.ilike(v)), None


def _is_temporal(tp: Any) -> bool:
    import datetime as dt

    return tp in (dt.datetime, dt.date)


def _same(v: Any) -> Any:
    return v
