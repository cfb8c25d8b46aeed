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

from workflow._types import check_value

from ._errors import ValidationError
from ._model import FieldInfo, ModelInfo

__all__ = ["OPERATORS", "FilterCompiler"]

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
            raise ValidationError(f"{where}", f"unknown field {name!r} (fields: {known})")
        return f

    def compile(self, flt: Mapping[str, Any] | None, where: str = "filter") -> ColumnElement[bool]:
        """The WHERE expression for `flt` (``true()`` for an empty filter)."""
        if flt is None:
            return true()
        if not isinstance(flt, Mapping):
            raise ValidationError(where, f"a filter must be an object, got {type(flt).__name__}")
        parts: list[ColumnElement[bool]] = []
        for key, value in flt.items():
            path = f"{where}.{key}"
            if isinstance(key, str) and key.startswith("$"):
                if key in ("$and", "$or"):
                    if not isinstance(value, list):
                        raise ValidationError(path, "expects a list of filters")
                    subs = [self.compile(v, f"{path}[{i}]") for i, v in enumerate(value)]
                    if key == "$and":
                        parts.append(and_(true(), *subs))
                    else:
                        parts.append(or_(false(), *subs))
                elif key == "$not":
                    parts.append(not_(self.compile(value, path)))
                else:
                    raise ValidationError(
                        path,
                        f"unknown operator {key!r} at the top level (use {', '.join(_LOGICAL)} "
                        f"or a field name)",
                    )
                continue
            f = self.field(key, path)
            parts.append(self._field_expr(f, value, path))
        return and_(true(), *parts) if parts else true()

    def _field_expr(self, f: FieldInfo, value: Any, path: str) -> ColumnElement[bool]:
        if isinstance(value, Mapping) and any(
            isinstance(k, str) and k.startswith("$") for k in value
        ):
            return and_(true(), *(self._op(f, op, v, f"{path}.{op}") for op, v in value.items()))
        return self._op(f, "$eq", value, path)

    def _value(self, f: FieldInfo, value: Any, path: str) -> Any:
        try:
            return check_value(f.base_type, value)
        except TypeError as exc:
            raise ValidationError(
                path, f"{exc} (field {f.name} is {f.base_type.__name__})"
            ) from None

    def _op(self, f: FieldInfo, op: Any, value: Any, path: str) -> ColumnElement[bool]:
        if op not in _FIELD_OPS:
            raise ValidationError(
                path, f"unknown operator {op!r} (operators: {', '.join(sorted(_FIELD_OPS))})"
            )
        col, conv = self.column(f)
        bt = f.base_type
        if op == "$null":
            if not isinstance(value, bool):
                raise ValidationError(path, "$null expects true or false")
            raw = self.table.c[f.name]
            return raw.is_(None) if value else raw.is_not(None)
        if op == "$not":
            return not_(self._field_expr(f, value, path))
        if bt in (dict, list):
            raise ValidationError(path, f"{op} is not supported on {bt.__name__} (JSON) fields")
        if op in ("$eq", "$ne"):
            if value is None:
                raw = self.table.c[f.name]
                return raw.is_(None) if op == "$eq" else raw.is_not(None)
            v = conv(self._value(f, value, path))
            return col == v if op == "$eq" else or_(col != v, self.table.c[f.name].is_(None))
        if op in ("$in", "$nin"):
            if not isinstance(value, list | tuple):
                raise ValidationError(path, f"{op} expects a list")
            vals = [conv(self._value(f, v, f"{path}[{i}]")) for i, v in enumerate(value)]
            if op == "$in":
                return col.in_(vals)
            return or_(col.not_in(vals), self.table.c[f.name].is_(None))
        if op in _RANGE:
            if not (bt in _ORDERED_TYPES or _is_temporal(bt)):
                raise ValidationError(
                    path, f"{op} is not supported on {bt.__name__} fields (not ordered)"
                )
            v = conv(self._value(f, value, path))
            expr: ColumnElement[bool]
            if op == "$gt":
                expr = col > v
            elif op == "$gte":
                expr = col >= v
            elif op == "$lt":
                expr = col < v
            else:
                expr = col <= v
            return expr
        # $like / $ilike
        if bt is not str:
            raise ValidationError(path, f"{op} is only supported on str fields")
        if not isinstance(value, str):
            raise ValidationError(path, f"{op} expects a str pattern")
        raw = self.table.c[f.name]
        return raw.like(value) if op == "$like" else raw.ilike(value)


def _is_temporal(tp: Any) -> bool:
    import datetime as dt

    return tp in (dt.datetime, dt.date)


def _same(v: Any) -> Any:
    return v
