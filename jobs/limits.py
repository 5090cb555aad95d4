"""Bounds on what a manifest may hold, so validating any input takes bounded time and memory
and every breach is a manifest problem with its path (exit 2), never a crash.

A manifest is untrusted input (it may come from any submitter on a shared farm). What is
bounded here: how many bytes a manifest or jobs file may hold once decompressed (read in
chunks and cut off past the limit, never inflated whole), and fewer for YAML (the costly
format to parse), how much YAML aliases may expand, how long a prompt (any text field) may be,
how many jobs a manifest may make in all (jobs + jobs file + every matrix), how deeply values
nest (parsers and validators recurse), text the results table cannot store (a lone UTF-16
surrogate is valid JSON, ``"\\ud800"``, but not UTF-8), and how long one problem message may be.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from storage.errors import shorten


def _env_int(name: str, default: int, scale: int = 1) -> int:
    """``default``, or the positive integer in environment variable ``name`` times ``scale``."""
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) * scale if raw and int(raw) > 0 else default
    except ValueError:
        return default


#: How deeply lists and mappings may nest in a manifest (a real one needs about 5).
MAX_NESTING = 32
#: Bytes a manifest or jobs file may hold after decompression (``jobs.jsonl.gz``): 64 MiB,
#: about 500,000 jobs in JSONL; ``LORA_FARM_MAX_MANIFEST_MB`` raises it for a bigger list.
MAX_MANIFEST_BYTES = _env_int("LORA_FARM_MAX_MANIFEST_MB", 64 << 20, scale=1 << 20)
#: Bytes of YAML a manifest, jobs file or farm config may hold: 8 MiB. Parsing YAML costs many
#: times what JSON does, in time and in memory, so a big job list belongs in JSONL or Parquet
#: (``jobs_file: jobs.jsonl``); ``LORA_FARM_MAX_YAML_MB``.
MAX_YAML_BYTES = _env_int("LORA_FARM_MAX_YAML_MB", 8 << 20, scale=1 << 20)
#: Nodes (scalars, lists, mappings) a YAML document may hold, counted from the parser's events
#: before any node is built: a YAML's cost goes by its nodes, and 8 MiB of ``[1,1,1,...]`` is
#: 4 million of them. 500,000 is 100,000 short jobs (5 nodes each, 7 MB); ``LORA_FARM_MAX_YAML_NODES``.
MAX_YAML_NODES = _env_int("LORA_FARM_MAX_YAML_NODES", 500_000)
#: Characters of a prompt or negative prompt (and of any other checked text field: a URI, a
#: path): every image's row stores its prompt, so a megabyte prompt costs a megabyte per job;
#: ``LORA_FARM_MAX_PROMPT_CHARS`` raises it.
MAX_PROMPT_CHARS = _env_int("LORA_FARM_MAX_PROMPT_CHARS", 10_000)
#: Jobs a manifest may make in all (jobs, jobs file and every matrix together), checked
#: before anything is expanded; ``LORA_FARM_MAX_JOBS`` raises it.
MAX_JOBS = _env_int("LORA_FARM_MAX_JOBS", 1_000_000)
#: Nodes YAML aliases may add to a document, counting each alias as the whole value it
#: names (a "billion laughs" document of a few hundred bytes would expand to 10**9).
MAX_ALIAS_NODES = 100_000
#: Characters of one problem message (a path plus a reason); longer ones are cut in the middle.
MAX_PROBLEM_CHARS = 500
#: Problems listed for one manifest; the rest are counted ("... and 12345 more problem(s)").
MAX_PROBLEMS = 1000


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


class ProblemsError(ValueError):
    """Input that cannot run; ``problems`` holds every ``"field.path: reason"`` found, at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple:
        # pickled across Ray: rebuild from the list, not from the joined message
        return (type(self), (self.problems,))


class Problems:
    """An ordered list of ``"path: reason"`` strings, each cut to ``MAX_PROBLEM_CHARS`` (a path
    or a reason may echo megabytes of input); past ``MAX_PROBLEMS`` they are only counted."""

    def __init__(self) -> None:
        self._listed: list[str] = []
        self._more = 0

    def add(self, path: str, message: str) -> None:
        if len(self._listed) < MAX_PROBLEMS:
            self._listed.append(shorten(f"{path}: {message}" if path else message, MAX_PROBLEM_CHARS))
        else:
            self._more += 1

    @property
    def items(self) -> list[str]:
        """The problems listed, then how many more there were."""
        return self._listed + ([f"... and {self._more} more problem(s)"] if self._more else [])

    def __len__(self) -> int:  # every problem counts: checks compare lengths to see if they added one
        return len(self._listed) + self._more


def check_document(data: Any, what: str, problems: Problems, error: Callable[[list[str]], Exception]) -> None:
    """A whole document (a manifest, a farm config) is a mapping nested no deeper than
    ``MAX_NESTING``, checked before anything recurses into it; else ``error`` is raised at once."""
    if not isinstance(data, Mapping):
        problems.add(what, f"must be a mapping of fields (got {type(data).__name__})")
        raise error(problems.items)
    if nesting_depth(data) > MAX_NESTING:
        problems.add(what, f"nested more than {MAX_NESTING} levels deep (jobs.limits.MAX_NESTING)")
        raise error(problems.items)


__all__ = [
    "MAX_ALIAS_NODES", "MAX_JOBS", "MAX_MANIFEST_BYTES", "MAX_NESTING", "MAX_PROBLEM_CHARS", "MAX_PROBLEMS",
    "MAX_PROMPT_CHARS", "MAX_YAML_BYTES", "MAX_YAML_NODES",
    "Problems", "ProblemsError", "check_document", "lone_surrogate", "nesting_depth", "shorten",
]
