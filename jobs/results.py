"""Result rows, their Parquet table, and output naming, on any fsspec filesystem.

Layout under an output root::

    images/<job_id>.png          one image per successful job
    results.parts/<n>.parquet    append-only parts, one per ``ResultsWriter.append``
    results.parquet              the merged table (``finalize``), latest row per job_id

Every file is written so that no reader ever sees half of it: on local disk a temp file
in the same directory is renamed over the target; on object stores the final key is
written once with the whole payload (objects appear atomically, and a "rename" there
would be a copy anyway). A run killed midway therefore leaves ``results.parquet`` (if
any) plus whole parts, and ``read_results`` merges both.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from storage.output import ensure_under, write_bytes_atomic

from .manifest import Job
from .sources import filesystem
from .validate import ID_RE, is_url

log = logging.getLogger("jobs.results")

RESULTS_NAME = "results.parquet"
PARTS_DIR = "results.parts"
IMAGES_DIR = "images"
STATUSES = ("ok", "failed")
_PART_RE = re.compile(r"(\d+)\.parquet\Z")


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
    lora_mode: str = ""              # dense LoRA mode the image was rendered with: merge | lowrank
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


def _join(root: str, *parts: str) -> str:
    """``root/part/...`` for URLs and local paths alike, without doubling slashes."""
    if is_url(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def image_uri(output_root: str, job_id: str) -> str:
    """``<root>/images/<job_id>.png``; ValueError if ``job_id`` could name anything else.

    Ids are validated by the manifest already; checking again here keeps a bad id from
    any other caller from writing outside the output root.
    """
    if not isinstance(job_id, str) or not ID_RE.match(job_id) or ".." in job_id or "/" in job_id:
        raise ValueError(f"job id {job_id!r} is not a safe file name")
    try:
        return ensure_under(_join(output_root, IMAGES_DIR), f"{job_id}.png")
    except ValueError as e:
        raise ValueError(f"image for job {job_id!r} would escape the output root {output_root!r}") from e


def write_image_atomic(output_uri: str, png_bytes: bytes, storage_options: Mapping | None = None) -> str:
    """Write a rendered PNG; returns ``output_uri``."""
    return write_bytes_atomic(output_uri, png_bytes, storage_options)


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class ResultsWriter:
    """Appends result rows durably as jobs finish; ``finalize`` merges them into one table.

    Each ``append`` writes one whole part file, so the dispatcher decides the granularity
    (one call per ``ray.wait`` batch is a good fit). Not safe for two writers on one root.
    """

    def __init__(self, output_root: str, storage_options: Mapping | None = None):
        self.output_root = output_root.rstrip("/") if is_url(output_root) else output_root
        self.storage_options = dict(storage_options or {})
        self.parts_uri = _join(self.output_root, PARTS_DIR)
        # continue after parts a killed run left, so they are never overwritten
        self._next = max((n for n, _ in _list_parts(self.output_root, self.storage_options)), default=-1) + 1

    def append(self, rows: Iterable[ResultRow | Mapping[str, Any]]) -> str | None:
        """Write ``rows`` as one new part; returns its URL (None when there were no rows)."""
        table = rows_to_table(rows)
        if table.num_rows == 0:
            return None
        url = _join(self.parts_uri, f"{self._next:06d}.parquet")
        write_bytes_atomic(url, _table_bytes(table), self.storage_options)
        self._next += 1
        return url

    def finalize(self) -> pa.Table:
        """Merge ``results.parquet`` and every part into ``results.parquet``; remove the parts.

        Parts are deleted oldest first, after the merged table is in place, so a crash
        at any point leaves a state that reads back to the same latest rows.
        """
        table, merged = _read_all(self.output_root, self.storage_options)
        write_bytes_atomic(_join(self.output_root, RESULTS_NAME), _table_bytes(table), self.storage_options)
        for url in merged:
            fs, path = filesystem(url, self.storage_options)
            fs.rm(path)
        return table


def _list_parts(output_root: str, storage_options: Mapping | None) -> list[tuple[int, str]]:
    """``[(n, url)]`` of the part files, in write order; temp files are ignored."""
    parts_uri = _join(output_root, PARTS_DIR)
    fs, path = filesystem(parts_uri, storage_options)
    fs.invalidate_cache(path)  # another process (the killed run) may have written since
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), name) for name in names if (m := _PART_RE.match(name))]
    return [(n, _join(parts_uri, name)) for n, name in sorted(found)]


def _read_table(url: str, storage_options: Mapping | None) -> list[ResultRow] | None:
    """The rows of one Parquet file, None if it is missing or unreadable (logged)."""
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            records = pq.read_table(f).to_pylist()
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - one bad part must not hide every other result
        log.warning("skipping unreadable results file %s: %s", url, e)
        return None
    return [ResultRow.from_dict(r) for r in records]


def _read_all(output_root: str, storage_options: Mapping | None) -> tuple[pa.Table, list[str]]:
    """Latest row per job_id over results.parquet then the parts; the part URLs read."""
    latest: dict[str, ResultRow] = {}
    read_parts = []
    base = _read_table(_join(output_root, RESULTS_NAME), storage_options) or []
    for row in base:
        latest[row.job_id] = row
    for _, url in _list_parts(output_root, storage_options):
        rows = _read_table(url, storage_options)
        if rows is None:
            continue
        read_parts.append(url)
        for row in rows:
            latest.pop(row.job_id, None)  # re-insert so the dict order is "last written last"
            latest[row.job_id] = row
    return rows_to_table(latest.values()), read_parts


def read_results_table(output_root: str, storage_options: Mapping | None = None) -> pa.Table:
    """``results.parquet`` plus any parts (a killed run's), latest row per job_id."""
    return _read_all(output_root, storage_options)[0]


def read_results(output_root: str, storage_options: Mapping | None = None) -> list[ResultRow]:
    """Like ``read_results_table``, as ``ResultRow`` objects; [] when nothing was written."""
    return [ResultRow.from_dict(r) for r in read_results_table(output_root, storage_options).to_pylist()]


def existing_images(output_root: str, storage_options: Mapping | None = None) -> set[str]:
    """Job ids that have ``images/<id>.png``, from one listing (not one request per job)."""
    fs, path = filesystem(_join(output_root, IMAGES_DIR), storage_options)
    fs.invalidate_cache(path)
    try:
        names = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    stems = (posixpath.basename(n.rstrip("/")) for n in names)
    return {s[: -len(".png")] for s in stems if s.endswith(".png") and not s.startswith(".")}


def completed_jobs(output_root: str, storage_options: Mapping | None = None,
                   rows: Iterable[ResultRow] | None = None) -> set[str]:
    """Ids whose latest row is ``ok`` and whose image exists: what a re-run may skip.
    ``rows``: the root's rows when the caller has read them already."""
    images = existing_images(output_root, storage_options)
    if rows is None:
        rows = read_results(output_root, storage_options)
    return {r.job_id for r in rows if r.status == "ok" and r.job_id in images}


__all__ = [
    "ResultRow", "ResultsWriter", "COLUMNS", "SCHEMA", "rows_to_table", "image_uri", "write_image_atomic",
    "read_results", "read_results_table", "completed_jobs", "existing_images",
]
