"""Job manifests: the dataclasses, validation of a whole manifest, loading one (reading: ``sources.py``).

A manifest is YAML or JSON (a mapping; see ``examples/README.md``), or a jobs-only file:
JSONL (one job per line) or Parquet (one job per row), which gets the tiny model and the
default output. A YAML/JSON manifest can also pull its job list from such a file with
``jobs_file:``. Validation never stops at the first problem: ``ManifestError.problems``
lists every one with its field path.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .limits import MAX_JOBS, ProblemsError, check_document
from .matrix import expand_matrices
from .options import FarmOptions
from .sources import UNPARSED, base_dir_of, parse, read_bytes, read_jobs_file, too_many
from .validate import (
    BAD, Problems, at, check_defaults, check_fields, check_job, check_list, check_model,
    check_options, check_output, check_storage_options, check_str, resolve_path,
)

TOP_FIELDS = ("model", "defaults", "output", "storage_options", "options", "jobs", "matrix", "jobs_file")
DEFAULT_OUTPUT = "out"
#: Render-relevant job fields: these (plus the LoRAs and the model) make the derived id.
RENDER_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "width", "height", "guidance")


class ManifestError(ProblemsError):
    """A manifest that cannot run; ``problems`` holds every ``"path: reason"`` found."""


@dataclass(frozen=True)
class LoraRef:
    uri: str                  # fsspec URL or local path
    strength: float = 1.0
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uri": self.uri, "strength": self.strength}
        if self.sha256:
            out["sha256"] = self.sha256
        return out


def _strength_key(strength: float) -> float:
    # round to 1e-6 so 0.8 and 0.80000001 route together; "+ 0.0" turns -0.0 into 0.0
    return round(float(strength), 6) + 0.0


def routing_key_of(loras: Any) -> str:
    """Order-independent routing key of LoRA refs; ``""`` when there is none.

    It names a set of LoRA references (URIs, checksums, strengths) so the scheduler can send
    jobs that need the same composition to the worker holding it; the worker's
    ``composition_key`` (``lora_core.composition_key``, ``"base"`` for none) hashes the
    adapters' content instead, and is what results store.
    """
    if not loras:
        return ""
    items = sorted((ref.uri, ref.sha256 or "", _strength_key(ref.strength)) for ref in loras)
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Job:
    job_id: str
    prompt: str
    seed: int
    loras: tuple[LoraRef, ...]
    steps: int
    width: int
    height: int
    guidance: float
    negative_prompt: str = ""
    priority: int = 0

    @property
    def routing_key(self) -> str:
        """Sorted ``(uri, sha256 or "", round(strength, 6))`` as JSON; ``""`` = no LoRA (``routing_key_of``)."""
        return routing_key_of(self.loras)

    def loras_json(self) -> str:
        """The LoRA list (in manifest order) as a JSON string, the form results store."""
        return json.dumps([ref.to_dict() for ref in self.loras], separators=(",", ":"), ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        """The job in manifest syntax: ``validate_manifest({"jobs": [job.to_dict()]})`` round-trips."""
        out: dict[str, Any] = {"id": self.job_id}
        out.update({name: getattr(self, name) for name in RENDER_FIELDS})
        out["priority"] = self.priority
        out["loras"] = [ref.to_dict() for ref in self.loras]
        return out

    def to_row(self) -> dict[str, Any]:
        """Flat columns for a results table (``loras`` as a JSON string)."""
        row = self.to_dict()
        row["job_id"] = row.pop("id")
        row["loras"] = self.loras_json()
        return row


@dataclass(frozen=True)
class Manifest:
    model: dict               # {"backend": "tiny"} | {"backend": "diffusers", "path": ...} | ...
    output: str               # fsspec URL or local dir
    storage_options: dict     # per protocol, e.g. {"s3": {...}}
    jobs: tuple[Job, ...]
    options: FarmOptions = field(default_factory=FarmOptions)
    # where it was read from (None: built in code): the LoRA URI policy's default root, not a manifest field
    base_dir: str | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A manifest mapping that validates back to an equal ``Manifest``."""
        return {
            "model": dict(self.model), "output": self.output,
            "storage_options": {k: dict(v) for k, v in self.storage_options.items()},
            "options": self.options.as_dict(), "jobs": [job.to_dict() for job in self.jobs],
        }


def job_content_id(fields: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> str:
    """First 16 hex digits of the sha256 of a job's render-relevant content.

    LoRAs count by checksum when one is given (the same file under two URLs is the same
    render) and by URI otherwise, sorted like the routing key. The model spec is included
    so a re-run with another model does not skip images rendered by the old one.
    """
    loras = sorted(
        (lora["sha256"] or lora["uri"], _strength_key(lora["strength"])) for lora in fields.get("loras") or ()
    )
    doc = {name: fields[name] for name in RENDER_FIELDS}
    doc["guidance"] = float(doc["guidance"])
    doc["loras"] = loras
    doc["model"] = dict(model or {"backend": "tiny"})
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make_job(fields: Mapping[str, Any], model: Mapping[str, Any]) -> Job:
    loras = tuple(LoraRef(lora["uri"], float(lora["strength"]), lora["sha256"]) for lora in fields["loras"])
    return Job(
        job_id=fields["id"] or job_content_id(fields, model), prompt=fields["prompt"], seed=int(fields["seed"]),
        loras=loras, steps=int(fields["steps"]), width=int(fields["width"]), height=int(fields["height"]),
        guidance=float(fields["guidance"]), negative_prompt=fields["negative_prompt"], priority=int(fields["priority"]),
    )


def validate_manifest(data: Any, base_dir: str | None = None, storage_options: dict | None = None) -> Manifest:
    """A ``Manifest`` from parsed data, or ``ManifestError`` listing every problem.

    ``base_dir`` (the manifest's directory or URL) anchors relative LoRA paths, the model
    path, ``output`` and ``jobs_file``; without it they stay relative to the working
    directory. ``storage_options`` (per protocol) are used to read ``jobs_file`` and are
    merged under the manifest's own, the caller's values winning.
    """
    problems = Problems()
    return _validate(data, base_dir, storage_options, problems)


def _validate(data: Any, base_dir: str | None, storage_options: dict | None, problems: Problems) -> Manifest:
    if isinstance(data, (list, tuple)):
        data = {"jobs": data}  # a bare list is a jobs-only manifest
    check_document(data, "manifest", problems, ManifestError)
    check_fields(data, TOP_FIELDS, "manifest", problems)

    def section(name: str, default: Any) -> Any:
        return default if data.get(name) is None else data[name]  # "key:" with no value = absent

    model = check_model(section("model", {}), "model", problems, base_dir)
    defaults = check_defaults(section("defaults", {}), "defaults", problems)
    output = check_output(section("output", DEFAULT_OUTPUT), "output", problems, base_dir)
    own_opts = check_storage_options(section("storage_options", {}), "storage_options", problems)
    opts = _merge_options(own_opts, storage_options)
    options = check_options(section("options", {}), "options", problems)
    entries = _job_entries(data, problems, defaults, base_dir, opts)
    if not entries and not problems.items:
        problems.add("jobs", "no jobs: give 'jobs', 'matrix' or 'jobs_file'")
    jobs = _build_jobs(entries, model, problems)
    if problems.items:
        raise ManifestError(problems.items)
    return Manifest(model=model, output=output, storage_options=opts, jobs=tuple(jobs), options=options,
                    base_dir=base_dir)


def _merge_options(own: dict, given: dict | None) -> dict:
    merged = {proto: dict(opts) for proto, opts in own.items()}
    for proto, opts in (given or {}).items():
        merged[proto] = {**merged.get(proto, {}), **dict(opts)}
    return merged


def _job_entries(data: Mapping, problems: Problems, defaults: dict, base_dir: str | None,
                 storage_options: dict) -> list[tuple[str, dict]]:
    """``[(path label, normalized fields)]`` from ``jobs``, ``jobs_file`` and ``matrix``, in that order."""
    entries: list[tuple[str, dict]] = []
    sources: list[tuple[str, Any]] = []
    if data.get("jobs") is not None:
        sources.append(("jobs", data["jobs"]))
    if data.get("jobs_file") is not None:
        where = check_str(data["jobs_file"], "jobs_file", problems, nonempty=True)
        if where is not BAD:
            sources.append(("jobs_file", read_jobs_file(resolve_path(where, base_dir), storage_options, problems,
                                                        base_dir=base_dir)))
    for path, raw_jobs in sources:
        items = check_list(raw_jobs, path, problems) if raw_jobs is not None else BAD
        if items is not BAD and len(entries) + len(items) > MAX_JOBS:  # before checking any of them
            problems.add(path, too_many(len(items)))
            items = BAD
        for i, raw in enumerate(items if items is not BAD else []):
            if raw is UNPARSED:  # a JSONL line that is not JSON: already reported
                continue
            fields = check_job(raw, at(path, i), problems, defaults, base_dir)
            if fields is not None:
                entries.append((at(path, i), fields))
    if data.get("matrix") is not None:
        entries.extend(expand_matrices(data["matrix"], "matrix", problems, defaults, base_dir,
                                       budget=MAX_JOBS - len(entries)))
    return entries


def _build_jobs(entries: list[tuple[str, dict]], model: dict, problems: Problems) -> list[Job]:
    """Jobs with their final ids; a repeated id (or identical content) is a problem."""
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for label, fields in entries:
        job = _make_job(fields, model)
        if job.job_id in seen:
            if fields["id"] is None:
                problems.add(label, f"same content as {seen[job.job_id]} (derived id '{job.job_id}'): "
                                    "remove one or give each an id")
            else:
                problems.add(label, f"duplicate id '{job.job_id}' (also {seen[job.job_id]})")
            continue
        seen[job.job_id] = label
        jobs.append(job)
    return jobs


def load_manifest(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> Manifest:
    """Read and validate a manifest from a local path or any fsspec URL.

    ``storage_options`` (per protocol) are used to read the manifest itself and any
    ``jobs_file``, and are merged into ``Manifest.storage_options``. Unreadable or
    unparsable files raise ``ManifestError`` like any other problem.
    """
    url = os.fspath(path_or_url)
    problems = Problems()
    try:
        blob = read_bytes(url, storage_options)
    except Exception as e:  # noqa: BLE001 - reported as a manifest problem, exit code 2
        raise ManifestError([f"{url}: cannot read: {type(e).__name__}: {e}"]) from e
    data = parse(url, blob, url, problems)
    if data is None:  # unparsable (already reported) or an empty document
        raise ManifestError(problems.items or [f"{url}: empty manifest"])
    # parse-level problems (duplicate keys, bad JSONL lines) are reported with the rest
    return _validate(data, base_dir_of(url), storage_options, problems)


__all__ = [
    "LoraRef", "Job", "Manifest", "ManifestError", "load_manifest", "validate_manifest",
    "job_content_id", "routing_key_of", "base_dir_of",
]
