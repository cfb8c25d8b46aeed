""" "Did you mean ...?": the closest known name to a misspelled one.

Every "unknown X" error of the engine and the server (node types, outputs, parameters,
inputs, workflow names) ends with the closest known name, so a typo is fixed from the
message alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]

#: How alike (difflib's ratio, 0 to 1) a known name must be to be suggested.
CUTOFF = 0.6


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to `name`, or None when none is alike enough.

    A name that differs only in case wins outright (`contactlistnode`); otherwise
    difflib's ratio, compared case-insensitively, picks the best one above `CUTOFF`.
    """
    if not isinstance(name, str) or not name:
        return None
    choices = sorted({k for k in known if isinstance(k, str) and k != name})
    by_lower = {c.lower(): c for c in choices}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    # bound the work for absurdly long names: nothing sensible is that long
    found = difflib.get_close_matches(name.lower()[:200], list(by_lower), n=1, cutoff=CUTOFF)
    return by_lower[found[0]] if found else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`" (did you mean X?)"` for the closest known name, or `""` when there is none."""
    best = closest(name, known)
    return f" (did you mean {best}?)" if best else ""
