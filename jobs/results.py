"""Result rows, their Parquet table, and output naming, on any fsspec filesystem.

Layout under an output root::

    images/<job_id>.png                  one image per successful job
    results.parts/<n>-<writer>.parquet   append-only parts, one per ``ResultsWriter.append``
    results.parquet                      the merged table (``finalize``), newest row per job_id

Every file is written so that no reader ever sees half of it: on local disk a temp file
in the same directory is renamed over the target; on object stores the final key is
written once with the whole payload (objects appear atomically, and a "rename" there
would be a copy anyway). A run killed midway therefore leaves ``results.parquet`` (if
any) plus whole parts, and ``read_results`` merges both.

Several writers (two ``farm run`` into one root) may share a root: part names carry a
per-writer id, so none overwrites another's; rows merge newest ``finished_at`` first per
job_id, wherever they were read from; ``finalize`` merges under the root's lock (local
disk, ``memory://``) or by compare-and-swap (S3), and deletes a part only once a table
holding its rows is in place that no later finalize can replace by one without them (on a
store with neither, parts stay).
Readers list and read the parts before the table, so a part compacted meanwhile is in the
table they read. An unreadable ``results.parquet`` is moved aside
(``results.parquet.corrupt-<time>``), never overwritten.
"""
from __future__ import annotations

import io
import logging
import os
import posixpath
import random
import re
import time
import uuid
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from storage.output import LockTimeout, ensure_under, exclusive, read_versioned, write_bytes_atomic, write_if_unchanged

from .rows import COLUMNS, MAX_ERROR_CHARS, SCHEMA, STATUSES, ResultRow, rows_to_table, storable
from .sources import filesystem
from .validate import ID_RE, is_url

log = logging.getLogger("jobs.results")

RESULTS_NAME = "results.parquet"
PARTS_DIR = "results.parts"
IMAGES_DIR = "images"
_PART_RE = re.compile(r"(\d+)(?:-[0-9a-f]+)?\.parquet\Z")  # "<n>.parquet" from before writer ids
#: Compare-and-swap attempts of one ``finalize`` before it leaves its parts for the next one.
FINALIZE_TRIES = 50
#: How long ``finalize`` waits for another writer's lock on the table before leaving its parts
#: for the next finalize (a merge takes seconds; a writer hung while holding it must not hang us).
FINALIZE_LOCK_TIMEOUT_S = 120.0


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


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class ResultsWriter:
    """Appends result rows durably as jobs finish; ``finalize`` merges them into one table.

    Each ``append`` writes one whole part file, so the dispatcher decides the granularity
    (one call per ``ray.wait`` batch is a good fit). Several writers may share a root (see
    the module notes): part names carry this writer's id.
    """

    def __init__(self, output_root: str, storage_options: Mapping | None = None):
        self.output_root = output_root.rstrip("/") if is_url(output_root) else output_root
        self.storage_options = dict(storage_options or {})
        self.parts_uri = _join(self.output_root, PARTS_DIR)
        self.writer_id = uuid.uuid4().hex[:12]
        # numbered after parts already there, so names sort roughly in write order
        self._next = max((n for n, _ in _list_parts(self.output_root, self.storage_options)), default=-1) + 1

    def append(self, rows: Iterable[ResultRow | Mapping[str, Any]]) -> str | None:
        """Write ``rows`` as one new part; returns its URL (None when there were no rows).

        A row that cannot be encoded lands as a failed row saying why; the others as they are.
        """
        table = storable([r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in rows])
        if table.num_rows == 0:
            return None
        url = _join(self.parts_uri, f"{self._next:06d}-{self.writer_id}.parquet")
        write_bytes_atomic(url, _table_bytes(table), self.storage_options)
        self._next += 1
        return url

    def finalize(self) -> pa.Table:
        """Merge ``results.parquet`` and every part into ``results.parquet``; remove the parts merged.

        Another writer may finalize at the same time: under the root's lock, or by
        compare-and-swap (a lost race merges again on top of the winner's table), a part is
        deleted only once the table that holds it can only be replaced by tables built on
        it. Where the store has neither, parts are kept (readers merge them). A crash at any
        point leaves a state that reads back to the same rows.
        """
        table_url = _join(self.output_root, RESULTS_NAME)
        try:
            return self._finalize(table_url)
        except LockTimeout as e:
            log.warning("results table %s not merged (%s): its rows stay in their parts, which every reader "
                        "and the next finalize merge", table_url, e)
            return read_results_table(self.output_root, self.storage_options)

    def _finalize(self, table_url: str) -> pa.Table:
        opts = self.storage_options
        with exclusive(table_url, opts, timeout_s=FINALIZE_LOCK_TIMEOUT_S) as locked:
            for _ in range(FINALIZE_TRIES):
                parts = _read_parts(self.output_root, opts)
                data, version = read_versioned(table_url, opts)
                base = _parse_table(table_url, data, opts, move_aside=True)
                table = rows_to_table(_merge(base, parts))
                if write_if_unchanged(table_url, _table_bytes(table), version, opts):
                    break
                time.sleep(random.uniform(0.005, 0.05))  # another finalize won: merge on top of its table
            else:
                log.warning("results table %s kept changing under %d merges; parts left for the next finalize",
                            table_url, FINALIZE_TRIES)
                return table
            if not (locked or version.cas):
                # no lock and no compare-and-swap: a finalize that read before a part existed may
                # still replace this table, so a part is only safe where it is: readers merge it
                log.info("results parts in %s kept: the store has neither a lock nor a compare-and-swap", self.parts_uri)
                return table
            for url, rows in parts:
                if rows is not None:
                    _remove(url, opts)
        return table


def _remove(url: str, storage_options: Mapping | None) -> None:
    fs, path = filesystem(url, storage_options)
    try:
        fs.rm(path)
    except FileNotFoundError:  # another finalize merged and removed it too
        pass


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


def _read_parts(output_root: str, storage_options: Mapping | None) -> list[tuple[str, list[ResultRow] | None]]:
    """``[(url, rows)]`` of every part, rows None for one unreadable or gone since the listing."""
    return [(url, _read_table(url, storage_options)) for _, url in _list_parts(output_root, storage_options)]


def _parse(data: bytes) -> list[ResultRow]:
    return [ResultRow.from_dict(r) for r in pq.read_table(pa.BufferReader(data)).to_pylist()]


def _read_table(url: str, storage_options: Mapping | None) -> list[ResultRow] | None:
    """The rows of one Parquet file, None if it is missing or unreadable (logged)."""
    fs, path = filesystem(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return _parse(data)
    except Exception as e:  # noqa: BLE001 - one bad part must not hide every other result
        log.warning("skipping unreadable results file %s: %s", url, e)
        return None


def _parse_table(url: str, data: bytes | None, storage_options: Mapping | None, move_aside: bool = False) -> list[ResultRow]:
    """The rows of ``results.parquet`` given its bytes; an unreadable one reads as empty, and
    with ``move_aside`` is first copied to ``results.parquet.corrupt-<time>`` (it is about to
    be replaced by the merge: its bytes must survive under the new name)."""
    if data is None:
        return []
    try:
        return _parse(data)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with it, its bytes are kept
        if not move_aside:
            log.warning("skipping unreadable results file %s: %s", url, e)
            return []
        aside = f"{url}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        write_bytes_atomic(aside, data, storage_options)
        log.warning("results table %s is unreadable (%s): moved aside to %s; the new table is merged from the parts",
                    url, e, aside)
        return []


def _merge(base: list[ResultRow], parts: list[tuple[str, list[ResultRow] | None]]) -> list[ResultRow]:
    """The newest row per job_id (by ``finished_at``; a tie goes to the part written later)."""
    latest: dict[str, ResultRow] = {}
    for rows in [base, *(rows for _, rows in parts)]:
        for row in rows or ():
            old = latest.get(row.job_id)
            if old is None or row.finished_at >= old.finished_at:
                latest.pop(row.job_id, None)  # re-insert so the dict order is "last written last"
                latest[row.job_id] = row
    return list(latest.values())


def _read_all(output_root: str, storage_options: Mapping | None) -> pa.Table:
    """Newest row per job_id over the parts then ``results.parquet``: read in that order, a part
    a finalize removes meanwhile is in the table read after it."""
    parts = _read_parts(output_root, storage_options)
    table_url = _join(output_root, RESULTS_NAME)
    fs, path = filesystem(table_url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        data = None
    return rows_to_table(_merge(_parse_table(table_url, data, storage_options), parts))


def read_results_table(output_root: str, storage_options: Mapping | None = None) -> pa.Table:
    """``results.parquet`` plus any parts (a killed run's, another writer's), newest row per job_id."""
    return _read_all(output_root, storage_options)


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
                   rows: Iterable[ResultRow] | None = None, images: set[str] | None = None) -> set[str]:
    """Ids whose latest row is ``ok`` and whose image exists: what a re-run may skip.
    ``rows`` / ``images``: the root's rows and ``existing_images`` when the caller has them already."""
    if images is None:
        images = existing_images(output_root, storage_options)
    if rows is None:
        rows = read_results(output_root, storage_options)
    return {r.job_id for r in rows if r.status == "ok" and r.job_id in images}


__all__ = [
    "ResultRow", "ResultsWriter", "COLUMNS", "SCHEMA", "rows_to_table", "image_uri",
    "read_results", "read_results_table", "completed_jobs", "existing_images", "storable", "STATUSES", "MAX_ERROR_CHARS",
    "FINALIZE_TRIES", "FINALIZE_LOCK_TIMEOUT_S",
]
