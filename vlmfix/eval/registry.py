"""Name lookup with "did you mean ...?" errors, shared by parsers, templates, tasks."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

from vlmfix.errors import ConfigError

__all__ = ["lookup"]

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, kind: str) -> T:
    """Return ``table[name]``; raise :class:`ConfigError` suggesting close names if absent.

    Example:
        >>> lookup({"llava": 1}, "llava", "template")
        1
    """
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown {kind} {name!r}{hint} Known: {sorted(table)}")
