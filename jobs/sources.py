"""Reading manifests and job files from storage: bytes from any fsspec URL, parsed by format.

YAML (duplicate keys reported, which PyYAML would drop), JSON, JSONL (one job per line; a
bad line is reported and keeps its index) and Parquet (one job per row). Problems are
recorded, never raised, so ``manifest.py`` reports them with every other one.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any, Mapping

import fsspec
import yaml

from storage.urls import options_for, protocol_of

from .limits import MAX_NESTING
from .validate import Problems, at, is_url

#: Stands in for a JSONL line that failed to parse, so later lines keep their index.
UNPARSED: Any = object()


def filesystem(url: str, storage_options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a local path or URL, with the options of its protocol.

    ``storage_options`` is per protocol (``{"s3": {...}}``), as in a manifest; ``s3a``
    falls back to ``s3`` and ``https`` to ``http``. Chained URLs get the whole dict.
    """
    if "::" in url:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fsspec.core.url_to_fs(url, **options_for(protocol_of(url), dict(storage_options or {})))


def read_bytes(url: str, storage_options: Mapping | None) -> bytes:
    """The whole file at ``url``, decompressed when its name says so (``jobs.jsonl.gz``)."""
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


def parse(url: str, blob: bytes, label: str, problems: Problems) -> Any:
    """``blob`` parsed by the format ``url``'s name says; None (problem recorded under ``label``) if it is not."""
    fmt = _format_of(url)
    if fmt == "parquet":
        return _parse_parquet(blob, label, problems)
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add(label, f"not UTF-8 text: {e}")
        return None
    try:
        if fmt == "jsonl":
            return _parse_jsonl(text, label, problems)
        if fmt == "json":
            return _parse_json(text, label, problems)
        return _parse_yaml(text, label, problems)  # .yaml, .yml and anything else (JSON is YAML)
    except RecursionError:  # the parsers recurse per level: a document nested thousands deep
        problems.add(label, f"nested too deeply to parse (a manifest may nest {MAX_NESTING} levels)")
        return None


def read_jobs_file(url: str, storage_options: Mapping | None, problems: Problems) -> Any:
    """The job list of a ``jobs_file:`` (a bare list, or a mapping with only ``jobs``); None if unreadable."""
    try:
        blob = read_bytes(url, storage_options)
    except Exception as e:  # noqa: BLE001 - any storage failure is a manifest problem here
        problems.add("jobs_file", f"cannot read {url}: {type(e).__name__}: {e}")
        return None
    data = parse(url, blob, "jobs_file", problems)
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


__all__ = ["UNPARSED", "base_dir_of", "filesystem", "parse", "read_bytes", "read_jobs_file"]
