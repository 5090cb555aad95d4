"""The one row type, worker to dispatcher to ``results.parquet``, and its Arrow schema.

A row keeps what the table can hold: an ``error`` cell is capped (``MAX_ERROR_CHARS``), and
``storable`` turns a row pyarrow cannot encode into a failed row saying so, so one bad value
costs its own row only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

import pyarrow as pa

from .manifest import Job

log = logging.getLogger("jobs.results")

STATUSES = ("ok", "failed")
#: An ``error`` cell longer than this is cut (a LoRA with megabyte key names made megabyte cells
#: and report pages); the cut says how long it was.
MAX_ERROR_CHARS = 2000


@dataclass
class ResultRow:
    """One job's outcome, worker to dispatcher to ``results.parquet``: the columns (``COLUMNS``), in order,
    plus the wire-only ``transient``."""

    job_id: str
    status: str                      # "ok" | "failed"
    output_uri: str = ""
    composition_key: str = ""
    worker_id: str = ""
    attempts: int = 1
    fetch_s: float = 0.0
    compose_s: float = 0.0
    render_s: float = 0.0
    error: str = ""
    lora_mode: str = ""              # dense LoRA mode the image was rendered with: merge | lowrank | lowrank+merge
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    loras: str = "[]"                # JSON list of {uri, strength, sha256?}
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance: float = 0.0
    finished_at: float = field(default_factory=time.time)  # unix seconds
    # not a column: whether a retry may succeed (out of memory, a lost actor); the worker
    # tells the dispatcher, results.parquet does not keep it
    transient: bool = field(default=False, metadata={"column": False})

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"result status must be one of {', '.join(STATUSES)} (got {self.status!r})")
        if not isinstance(self.job_id, str) or not self.job_id:
            raise ValueError(f"result job_id must be a non-empty string (got {self.job_id!r})")
        if isinstance(self.error, str) and len(self.error) > MAX_ERROR_CHARS:
            self.error = cap_text(self.error, MAX_ERROR_CHARS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ResultRow":
        """A row from any mapping (a worker's dict, a Parquet record).

        Unknown keys are dropped, None means "default", and values are coerced to the
        column types (numpy scalars, an int for a float column, a LoRA list for ``loras``).
        """
        kwargs = {}
        for f in fields(cls):
            value = data.get(f.name)
            if value is not None:
                kwargs[f.name] = _coerce(value, f.type)
        return cls(**kwargs)

    @classmethod
    def from_job(cls, job: Job, status: str, **values: Any) -> "ResultRow":
        """A row carrying the job's prompt, seed, LoRAs and size, plus the outcome ``values``.

        ``composition_key`` defaults to the job's routing key, so a job that failed before
        any worker composed it still lands in a gallery group.
        """
        row = job.to_row()
        row["composition_key"] = job.routing_key
        row.update(values)
        row["status"] = status
        return cls.from_dict(row)

    @classmethod
    def ok(cls, job: Job, *, output_uri: str, composition_key: str, worker_id: str, fetch_s: float,
           compose_s: float, render_s: float, lora_mode: str) -> "ResultRow":
        """A rendered job: its image at ``output_uri``, composed as ``composition_key`` (a content hash)."""
        return cls.from_job(job, "ok", output_uri=output_uri, composition_key=composition_key, worker_id=worker_id,
                            fetch_s=fetch_s, compose_s=compose_s, render_s=render_s, lora_mode=lora_mode)

    @classmethod
    def failed(cls, job: Job, error: str, *, worker_id: str = "", transient: bool = False,
               fetch_s: float = 0.0, compose_s: float = 0.0) -> "ResultRow":
        """A job that failed with ``error``; ``transient``: a retry elsewhere may succeed.

        Nothing was composed for it, so its ``composition_key`` is empty (not the routing key).
        """
        return cls.from_job(job, "failed", error=error, worker_id=worker_id, transient=transient,
                            fetch_s=fetch_s, compose_s=compose_s, composition_key="")

    def recorded(self, attempts: int) -> "ResultRow":
        """This row as the dispatcher records it: after ``attempts`` sends, finished now."""
        return dataclasses.replace(self, attempts=attempts, finished_at=time.time())

    def to_dict(self) -> dict[str, Any]:
        """The ``results.parquet`` columns (``COLUMNS``), by name."""
        return {name: getattr(self, name) for name in COLUMNS}  # flat: no deep copy (hot path)


def cap_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying how many were cut."""
    if len(text) <= limit:
        return text
    tail = f" ... [cut from {len(text)} chars]"
    return text[: max(0, limit - len(tail))] + tail


def _coerce(value: Any, kind: str) -> Any:
    if kind == "bool":
        return bool(value)
    if kind == "str":
        if isinstance(value, str):
            return value
        return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
    return int(value) if kind == "int" else float(value)


# annotations are strings under "from __future__ import annotations"
_ARROW = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
#: The columns of ``results.parquet``, in order (``ResultRow``'s fields less the wire-only ones).
COLUMNS = tuple(f.name for f in fields(ResultRow) if f.metadata.get("column", True))
SCHEMA = pa.schema([pa.field(f.name, _ARROW[f.type]) for f in fields(ResultRow) if f.name in COLUMNS])


def rows_to_table(rows: Iterable[ResultRow | Mapping[str, Any]]) -> pa.Table:
    """A table with ``SCHEMA``; dict rows go through ``ResultRow.from_dict`` first."""
    rows = [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in rows]
    return pa.Table.from_pylist([r.to_dict() for r in rows], schema=SCHEMA)


def storable(rows: list[ResultRow]) -> pa.Table:
    """``rows_to_table``, where a row pyarrow cannot encode becomes a failed row saying so.

    One bad value (a lone surrogate in a prompt) must cost its own row, not the part file and
    every other job's row in it.
    """
    try:
        return rows_to_table(rows)
    except (pa.ArrowException, UnicodeError, ValueError, TypeError, OverflowError):
        pass
    tables = []
    for row in rows:
        try:
            tables.append(rows_to_table([row]))
        except (pa.ArrowException, UnicodeError, ValueError, TypeError, OverflowError) as e:
            log.error("result row of job %r cannot be stored (%s): recorded as failed", row.job_id, type(e).__name__)
            try:
                tables.append(rows_to_table([_unstorable(row, e)]))
            except (pa.ArrowException, UnicodeError, ValueError, TypeError, OverflowError):  # a number out of range
                bare = ResultRow(job_id=_escaped(row.job_id), status="failed", error=_unstorable(row, e).error)
                tables.append(rows_to_table([bare]))
    return pa.concat_tables(tables)


def _escaped(value: Any) -> Any:
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


def _unstorable(row: ResultRow, e: BaseException) -> ResultRow:
    """``row`` as a failed row with its text escaped (``\\ud800``), so the table can hold it."""
    text = {f.name: _escaped(getattr(row, f.name)) for f in fields(ResultRow) if f.type == "str"}
    reason = cap_text(f"{type(e).__name__}: {e}", 300)
    text["error"] = f"ResultEncodingError: this job's result row could not be stored ({reason}); text shown escaped"
    return dataclasses.replace(row, **{**text, "status": "failed", "transient": False})


__all__ = ["ResultRow", "COLUMNS", "SCHEMA", "STATUSES", "MAX_ERROR_CHARS", "rows_to_table", "storable", "cap_text"]
