"""`{{name}}` placeholders in node parameters.

A placeholder that is a whole value is replaced by the input's value as it is (so it keeps
its type); one embedded in a longer string is rendered as text. Placeholders are found in
values only, at any depth of dicts and lists; dict keys are never templated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PLACEHOLDER", "Template", "find_placeholders", "is_template"]

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_WHOLE = re.compile(r"^\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")


@dataclass(frozen=True)
class Use:
    """One place an input is used: whole (keeps its type) or embedded in text; nested
    tells whether it sits inside a dict or list rather than being the parameter itself."""

    name: str
    whole: bool
    nested: bool


def is_template(value: Any) -> bool:
    """Whether `value` contains at least one placeholder."""
    if isinstance(value, str):
        return PLACEHOLDER.search(value) is not None
    if isinstance(value, Mapping):
        return any(is_template(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(is_template(v) for v in value)
    return False


def find_placeholders(value: Any, nested: bool = False) -> list[Use]:
    """Every placeholder use in `value`, in order."""
    if isinstance(value, str):
        m = _WHOLE.match(value)
        if m:
            return [Use(m.group(1), True, nested)]
        return [Use(n, False, nested) for n in PLACEHOLDER.findall(value)]
    if isinstance(value, Mapping):
        return [u for v in value.values() for u in find_placeholders(v, True)]
    if isinstance(value, list | tuple):
        return [u for v in value for u in find_placeholders(v, True)]
    return []


def _compile(value: Any) -> Callable[[Mapping[str, Any]], Any]:
    if isinstance(value, str):
        m = _WHOLE.match(value)
        if m:
            name = m.group(1)
            return lambda inputs: inputs[name]
        if PLACEHOLDER.search(value) is None:
            return lambda inputs: value
        parts = PLACEHOLDER.split(value)  # text, name, text, name, ..., text
        texts, names = parts[0::2], parts[1::2]

        def render_text(inputs: Mapping[str, Any]) -> str:
            out = [texts[0]]
            for name, text in zip(names, texts[1:], strict=True):
                out.append(str(inputs[name]))
                out.append(text)
            return "".join(out)

        return render_text
    if isinstance(value, Mapping):
        items = [(k, _compile(v)) for k, v in value.items()]
        return lambda inputs: {k: f(inputs) for k, f in items}
    if isinstance(value, list | tuple):
        fns = [_compile(v) for v in value]
        return lambda inputs: [f(inputs) for f in fns]
    return lambda inputs: value


class Template:
    """A compiled parameter value with placeholders; `render(inputs)` fills them in."""

    __slots__ = ("render", "source", "uses")

    def __init__(self, source: Any) -> None:
        self.source = source
        self.uses = find_placeholders(source)
        self.render = _compile(source)
