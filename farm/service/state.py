"""The state root: one JSON record per run, so a farm that restarts knows its runs.

Layout: ``{root}/runs/{run_id}.json``, one file per run, each written whole and atomically
(``storage.output.write_bytes_atomic``), on any fsspec URL (a local dir, ``memory://``,
``s3://``). A record never holds ``storage_options``: those are credentials, and the state
root is readable by whoever operates the farm; a record only says the run had some
(``has_secrets``), and the controller keeps them in memory. Torch-free, no Ray.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping

from storage.output import write_bytes_atomic
from storage.urls import open_filesystem

__all__ = [
    "RUN_STATES", "ACTIVE_STATES", "RUN_ID_RE", "RunRecord", "StateRecordError", "StateStore",
    "run_id_for", "check_run_id", "strip_secrets",
]

log = logging.getLogger(__name__)

RUN_STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
#: What ``run_id_for`` makes ("r-" + 16 hex); ids from elsewhere may be longer but no less safe:
#: a run id becomes a file name, so no ``/``, no ``..``, no leading dot.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")


class StateRecordError(ValueError):
    """A run record that cannot be read back; the message names the field (and the file)."""


def check_run_id(run_id: Any) -> str:
    """``run_id`` if it is safe as a file name (``RUN_ID_RE``), else ``ValueError`` naming it."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use 1-128 of A-Z a-z 0-9 _ -, starting with a letter or digit")
    return run_id


def _has_secrets(storage_options: Any) -> bool:
    """True when ``storage_options`` holds any option at all (``{"s3": {}}`` holds none)."""
    if not storage_options:
        return False
    if not isinstance(storage_options, Mapping):
        return True
    return any(bool(opts) for opts in storage_options.values())


def strip_secrets(manifest: Mapping[str, Any]) -> tuple[dict, bool]:
    """``(manifest without storage_options, whether it had any)``: what a ``RunRecord`` may hold."""
    out = {k: v for k, v in manifest.items() if k != "storage_options"}
    return out, _has_secrets(manifest.get("storage_options"))


def run_id_for(manifest: Mapping[str, Any], output: str) -> str:
    """The run id of ``manifest`` (``Manifest.to_dict()`` form) rendering into ``output``.

    ``"r-"`` + 16 hex of the sha256 of the canonical JSON of the model, the options, the
    output and the sorted job ids: the same manifest resubmitted gets the same id (and so is
    recognised as the same run), another output or another job list gets another. The
    ``storage_options`` do not count: new credentials do not make a new run.
    """
    jobs = manifest.get("jobs") or ()
    doc = {
        "model": manifest.get("model") or {},
        "options": manifest.get("options") or {},
        "output": output,
        "jobs": sorted(str(job.get("id")) if isinstance(job, Mapping) else str(job) for job in jobs),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return "r-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: Each field's check and what it must be, for ``from_json``'s messages.
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "run_id": (lambda v: isinstance(v, str) and bool(RUN_ID_RE.match(v)), "a safe run id"),
    "manifest": (lambda v: isinstance(v, dict), "a mapping"),
    "output": (lambda v: isinstance(v, str), "a string"),
    "submitter": (lambda v: isinstance(v, str), "a string"),
    "priority": (_is_int, "an integer"),
    "state": (lambda v: v in RUN_STATES, "one of " + ", ".join(RUN_STATES)),
    "total": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "ok": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "failed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "created_at": (_is_number, "a finite number"),
    "updated_at": (_is_number, "a finite number"),
    "error": (lambda v: isinstance(v, str), "a string"),
    "has_secrets": (lambda v: isinstance(v, bool), "a boolean"),
    "cancel_requested": (lambda v: isinstance(v, bool), "a boolean"),
}
_REQUIRED = ("run_id", "manifest", "output")


@dataclass
class RunRecord:
    """What the state root knows of one run: its manifest (no secrets), progress and state."""

    run_id: str
    manifest: dict           # Manifest.to_dict() without storage_options
    output: str
    submitter: str = "default"
    priority: int = 0
    state: str = "queued"
    total: int = 0
    ok: int = 0
    failed: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    error: str = ""          # why the run failed as a whole, if it did
    has_secrets: bool = False  # it came with storage_options (kept by the controller, not here)
    cancel_requested: bool = False  # `farm cancel` was asked while jobs were in flight: never started again

    @property
    def active(self) -> bool:
        """Still to run or running (``queued`` / ``running``)."""
        return self.state in ACTIVE_STATES

    def to_json(self) -> bytes:
        """The record as UTF-8 JSON (sorted keys, so equal records are equal bytes)."""
        doc = dataclasses.asdict(self)
        for name in ("created_at", "updated_at"):  # 5 and 5.0 are one time: written one way
            if _is_number(doc[name]):
                doc[name] = float(doc[name])
        return json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> "RunRecord":
        """A record from ``to_json``'s bytes; ``StateRecordError`` naming the field otherwise.

        Keys this version does not know are ignored (a newer farm may have written them), so
        a state root stays readable across an upgrade and a downgrade.
        """
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise StateRecordError(f"run record: not JSON ({e})") from e
        if not isinstance(raw, dict):
            raise StateRecordError(f"run record: must be a JSON object (got {type(raw).__name__})")
        for name in _REQUIRED:
            if name not in raw:
                raise StateRecordError(f"run record: {name}: required")
        fields = {}
        for name, (ok, what) in _FIELD_CHECKS.items():
            if name in raw:
                if not ok(raw[name]):
                    raise StateRecordError(f"run record: {name}: must be {what} (got {type(raw[name]).__name__} "
                                           f"{str(raw[name])[:40]!r})")
                fields[name] = raw[name]
        for name in ("created_at", "updated_at"):
            if name in fields:
                fields[name] = float(fields[name])
        return cls(**fields)


class StateStore:
    """The run records under one state root (any fsspec URL or a local dir).

    Each ``put`` replaces a record whole and atomically, so a reader sees the old record or
    the new one; writers of one run are the controller alone, so there is no merging here.
    """

    def __init__(self, root: str, storage_options: dict | None = None):
        if not isinstance(root, str) or not root.strip():
            raise ValueError(f"state root must be a non-empty path or URL (got {root!r})")
        root = root.strip()
        self.root = root if root.endswith("://") else root.rstrip("/")
        self._storage_options = dict(storage_options or {})

    def __repr__(self) -> str:  # the options may hold credentials
        return f"StateStore({self.root!r})"

    @property
    def runs_dir(self) -> str:
        """Where the records live: ``{root}/runs``."""
        return self.root + "runs" if self.root.endswith("://") else f"{self.root}/runs"

    def url_of(self, run_id: str) -> str:
        """The URL of ``run_id``'s record; ``ValueError`` for an id that is not safe as a name."""
        return f"{self.runs_dir}/{check_run_id(run_id)}.json"

    def put(self, record: RunRecord) -> None:
        """Write ``record`` atomically; refuses one whose manifest still holds ``storage_options``."""
        check_run_id(record.run_id)
        if record.state not in RUN_STATES:
            raise ValueError(f"run {record.run_id}: state must be one of {', '.join(RUN_STATES)} "
                             f"(got {record.state!r})")
        if _has_secrets(record.manifest.get("storage_options")):
            raise ValueError(f"run {record.run_id}: the manifest still holds storage_options; they are "
                             "never written to the state root (strip_secrets, then set has_secrets)")
        write_bytes_atomic(self.url_of(record.run_id), record.to_json(), self._storage_options)

    def get(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, None when there is none; ``StateRecordError`` when it is unreadable."""
        url = self.url_of(run_id)
        fs, path = open_filesystem(url, self._storage_options)
        try:
            blob = fs.cat_file(path)
        except FileNotFoundError:
            return None
        record = self._decode(blob, url)
        if record.run_id != run_id:
            raise StateRecordError(f"{url}: run_id: the record says {record.run_id!r}")
        return record

    def list(self) -> list[RunRecord]:
        """Every run, oldest first (by ``created_at``, then id); a record that cannot be read is
        skipped with a warning naming it, so one bad file never hides the others."""
        fs, path = open_filesystem(self.runs_dir, self._storage_options)
        try:
            fs.invalidate_cache(path)  # object stores cache listings; another process may have written
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        records = []
        for name in sorted(names):
            base = posixpath.basename(str(name).rstrip("/"))
            run_id = base[:-len(".json")] if base.endswith(".json") else ""
            if not RUN_ID_RE.match(run_id):
                continue  # a writer's temp file (".r-x.json.1234.tmp") or something not ours
            url = f"{self.runs_dir}/{base}"
            try:
                record = self._decode(fs.cat_file(name), url)
                if record.run_id != run_id:
                    raise StateRecordError(f"{url}: run_id: the record says {record.run_id!r}")
            except FileNotFoundError:
                continue  # deleted since the listing
            except Exception as e:  # noqa: BLE001 - one bad record must not break the listing
                log.warning("skipping unreadable run record %s: %s", url, e)
                continue
            records.append(record)
        records.sort(key=lambda r: (r.created_at, r.run_id))
        return records

    def delete(self, run_id: str) -> None:
        """Remove ``run_id``'s record; one that is already gone is fine."""
        url = self.url_of(run_id)
        fs, path = open_filesystem(url, self._storage_options)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _decode(blob: bytes, url: str) -> RunRecord:
        try:
            return RunRecord.from_json(blob)
        except StateRecordError as e:
            raise StateRecordError(f"{url}: {e}") from e
