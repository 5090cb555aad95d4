"""Bounds on what a manifest may hold, so validating any input takes bounded time and memory
and every breach is a manifest problem with its path (exit 2), never a crash.

A manifest is untrusted input (it may come from any submitter on a shared farm). What is
bounded here: how deeply values nest (parsers and validators recurse), and text the results
table cannot store (a lone UTF-16 surrogate is valid JSON, ``"\\ud800"``, but not UTF-8).
"""
from __future__ import annotations

from typing import Any

#: How deeply lists and mappings may nest in a manifest (a real one needs about 5).
MAX_NESTING = 32


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """How deeply ``value``'s lists and mappings nest (a scalar is 0), counted without
    recursion and no further than ``limit + 1``: enough to say the limit is passed."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate in ``text`` (text no UTF-8 file, Parquet
    table or PNG name can hold), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


__all__ = ["MAX_NESTING", "nesting_depth", "lone_surrogate"]
