"""Job manifests: the dataclasses, validation of a whole manifest, and loading from storage.

A manifest is YAML or JSON (a mapping; see ``examples/README.md``), or a jobs-only file:
JSONL (one job per line) or Parquet (one job per row), which gets the tiny model and the
default output. A YAML/JSON manifest can also pull its job list from such a file with
``jobs_file:``. Validation never stops at the first problem: ``ManifestError.problems``
lists every one with its field path.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

import fsspec
import yaml

from lora_core.store_io import options_for, protocol_of  # torch-free: lora_core imports lazily

from .matrix import expand_matrices
from .validate import (
    BAD, Problems, at, check_defaults, check_fields, check_job, check_list, check_model,
    check_options, check_output, check_storage_options, check_str, is_url, resolve_path,
)

TOP_FIELDS = ("model", "defaults", "output", "storage_options", "options", "jobs", "matrix", "jobs_file")
DEFAULT_OUTPUT = "out"
#: Render-relevant job fields: these (plus the LoRAs and the model) make the derived id.
RENDER_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "width", "height", "guidance")


#: Stands in for a JSONL line that failed to parse, so later lines keep their index.
UNPARSED: Any = object()


class ManifestError(ValueError):
    """A manifest that cannot run; ``problems`` holds every ``"path: reason"`` found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple:
        # pickled across Ray: rebuild from the list, not from the joined message
        return (type(self), (self.problems,))


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


def composition_of(loras: Any) -> str:
    """Order-independent routing key of LoRA refs; ``""`` when there is none."""
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
    def composition(self) -> str:
        """Routing key: sorted ``(uri, sha256 or "", round(strength, 6))``; ``""`` = no LoRA."""
        return composition_of(self.loras)

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
        row["composition"] = self.composition
        return row


@dataclass(frozen=True)
class Manifest:
    model: dict               # {"backend": "tiny"} | {"backend": "diffusers", "path": ...} | ...
    output: str               # fsspec URL or local dir
    storage_options: dict     # per protocol, e.g. {"s3": {...}}
    jobs: tuple[Job, ...]
    options: dict = field(default_factory=dict)  # lora_mode, max_batch, retries (all present)

    def to_dict(self) -> dict[str, Any]:
        """A manifest mapping that validates back to an equal ``Manifest``."""
        return {
            "model": dict(self.model), "output": self.output,
            "storage_options": {k: dict(v) for k, v in self.storage_options.items()},
            "options": dict(self.options), "jobs": [job.to_dict() for job in self.jobs],
        }


def content_id(fields: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> str:
    """First 16 hex digits of the sha256 of a job's render-relevant content.

    LoRAs count by checksum when one is given (the same file under two URLs is the same
    render) and by URI otherwise, sorted like the composition. The model spec is included
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
        job_id=fields["id"] or content_id(fields, model), prompt=fields["prompt"], seed=int(fields["seed"]),
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
    if not isinstance(data, Mapping):
        problems.add("manifest", f"must be a mapping of fields (got {type(data).__name__})")
        raise ManifestError(problems.items)
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
    return Manifest(model=model, output=output, storage_options=opts, jobs=tuple(jobs), options=options)


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
            sources.append(("jobs_file", _read_jobs_file(resolve_path(where, base_dir), storage_options, problems)))
    for path, raw_jobs in sources:
        items = check_list(raw_jobs, path, problems) if raw_jobs is not None else BAD
        for i, raw in enumerate(items if items is not BAD else []):
            if raw is UNPARSED:  # a JSONL line that is not JSON: already reported
                continue
            fields = check_job(raw, at(path, i), problems, defaults, base_dir)
            if fields is not None:
                entries.append((at(path, i), fields))
    if data.get("matrix") is not None:
        entries.extend(expand_matrices(data["matrix"], "matrix", problems, defaults, base_dir))
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


# ---- reading -----------------------------------------------------------------------------
def filesystem(url: str, storage_options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a local path or URL, with the options of its protocol.

    ``storage_options`` is per protocol (``{"s3": {...}}``), as in a manifest; ``s3a``
    falls back to ``s3`` and ``https`` to ``http``. Chained URLs get the whole dict.
    """
    if "::" in url:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fsspec.core.url_to_fs(url, **options_for(protocol_of(url), dict(storage_options or {})))


def _read_bytes(url: str, storage_options: Mapping | None) -> bytes:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb", compression="infer") as f:
        return f.read()


def _format_of(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    compression = fsspec.utils.infer_compression(name)
    if compression:
        name = name.rsplit(".", 1)[0]  # jobs.jsonl.gz -> jobs.jsonl
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    return {"yml": "yaml", "ndjson": "jsonl", "pq": "parquet"}.get(ext, ext)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that reports duplicate keys (PyYAML would silently keep the last)."""

    duplicates: list[str]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                self.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, label: str, problems: Problems) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.duplicates = []
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        problems.add(label, f"invalid YAML: {e}")
        return None
    finally:
        for dup in loader.duplicates:
            problems.add(label, dup)
        loader.dispose()


def _parse_json(text: str, label: str, problems: Problems) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in items]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            problems.add(label, f"duplicate key '{key}'")
        return dict(items)

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        problems.add(label, f"invalid JSON: {e}")
        return None


def _parse_jsonl(text: str, label: str, problems: Problems) -> list:
    jobs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            before = len(problems)
            job = _parse_json(line, f"{label} line {n}", problems)
            jobs.append(UNPARSED if len(problems) > before and job is None else job)
    return jobs


def _parse_parquet(blob: bytes, label: str, problems: Problems) -> list:
    """One job per row; null cells mean "not given", ``loras`` may be a JSON string."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(blob)).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        problems.add(label, f"invalid Parquet: {e}")
        return []
    jobs = []
    for i, row in enumerate(rows):
        job = {k: v for k, v in row.items() if v is not None and v == v}  # v != v: NaN from pandas
        if isinstance(job.get("loras"), str):
            job["loras"] = _parse_json(job["loras"], at(at(label, i), "loras"), problems)
        if isinstance(job.get("loras"), list):
            job["loras"] = [{k: v for k, v in ref.items() if v is not None} if isinstance(ref, dict) else ref
                            for ref in job["loras"]]
        jobs.append(job)
    return jobs


def _parse(url: str, blob: bytes, label: str, problems: Problems) -> Any:
    fmt = _format_of(url)
    if fmt == "parquet":
        return _parse_parquet(blob, label, problems)
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add(label, f"not UTF-8 text: {e}")
        return None
    if fmt == "jsonl":
        return _parse_jsonl(text, label, problems)
    if fmt == "json":
        return _parse_json(text, label, problems)
    return _parse_yaml(text, label, problems)  # .yaml, .yml and anything else (JSON is YAML)


def _read_jobs_file(url: str, storage_options: Mapping | None, problems: Problems) -> Any:
    try:
        blob = _read_bytes(url, storage_options)
    except Exception as e:  # noqa: BLE001 - any storage failure is a manifest problem here
        problems.add("jobs_file", f"cannot read {url}: {type(e).__name__}: {e}")
        return None
    data = _parse(url, blob, "jobs_file", problems)
    if isinstance(data, Mapping) and set(data) == {"jobs"}:
        return data["jobs"]
    return data


def base_dir_of(url: str) -> str:
    """The directory (or URL prefix) that relative paths in the manifest at ``url`` refer to."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if is_url(url):
        return posixpath.dirname(url.rstrip("/"))
    return os.path.dirname(os.path.abspath(os.path.expanduser(url)))


def load_manifest(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> Manifest:
    """Read and validate a manifest from a local path or any fsspec URL.

    ``storage_options`` (per protocol) are used to read the manifest itself and any
    ``jobs_file``, and are merged into ``Manifest.storage_options``. Unreadable or
    unparsable files raise ``ManifestError`` like any other problem.
    """
    url = os.fspath(path_or_url)
    problems = Problems()
    try:
        blob = _read_bytes(url, storage_options)
    except Exception as e:  # noqa: BLE001 - reported as a manifest problem, exit code 2
        raise ManifestError([f"{url}: cannot read: {type(e).__name__}: {e}"]) from e
    data = _parse(url, blob, url, problems)
    if data is None:  # unparsable (already reported) or an empty document
        raise ManifestError(problems.items or [f"{url}: empty manifest"])
    # parse-level problems (duplicate keys, bad JSONL lines) are reported with the rest
    return _validate(data, base_dir_of(url), storage_options, problems)


__all__ = [
    "LoraRef", "Job", "Manifest", "ManifestError", "load_manifest", "validate_manifest",
    "content_id", "composition_of", "filesystem", "base_dir_of",
]
