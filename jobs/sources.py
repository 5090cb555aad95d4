"""Reading manifests and job files from storage: bytes from any fsspec URL, parsed by format.

YAML (duplicate keys reported, which PyYAML would drop), JSON, JSONL (one job per line; a
bad line is reported and keeps its index) and Parquet (one job per row). Problems are
recorded, never raised, so ``manifest.py`` reports them with every other one. Reading is
bounded (``limits.py``): at most ``MAX_MANIFEST_BYTES`` are read or decompressed, YAML aliases
add at most ``MAX_ALIAS_NODES`` nodes, a Parquet file is checked by its metadata and by the
size its columns decode to before any row becomes a Python value.
"""
from __future__ import annotations

import collections
import io
import json
import os
import posixpath
from typing import Any, Mapping

import fsspec
import yaml

from storage.urls import open_filesystem

from .limits import MAX_ALIAS_NODES, MAX_JOBS, MAX_MANIFEST_BYTES, MAX_NESTING
from .validate import Problems, at, is_url

#: Stands in for a JSONL line that failed to parse, so later lines keep their index.
UNPARSED: Any = object()


def filesystem(url: str, storage_options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a local path or URL, with the options of its protocol (``storage_options``
    per protocol, as in a manifest): storage's ``open_filesystem``, the one place that does it."""
    return open_filesystem(url, dict(storage_options or {}))


class TooLargeError(ValueError):
    """A manifest or jobs file past ``MAX_MANIFEST_BYTES`` (after decompression)."""


def too_large(what: str = "holds") -> str:
    return (f"{what} more than {MAX_MANIFEST_BYTES >> 20} MiB (jobs.limits.MAX_MANIFEST_BYTES; "
            "set LORA_FARM_MAX_MANIFEST_MB for more)")


def read_bytes(url: str, storage_options: Mapping | None, limit: int | None = None) -> bytes:
    """The file at ``url``, decompressed when its name says so (``jobs.jsonl.gz``); at most
    ``limit`` bytes (``MAX_MANIFEST_BYTES``), else ``TooLargeError`` as soon as one more
    arrives: a small archive that inflates to gigabytes is cut off, not inflated."""
    limit = MAX_MANIFEST_BYTES if limit is None else limit
    fs, path = filesystem(url, storage_options)
    out = bytearray()
    with fs.open(path, "rb", compression="infer") as f:
        while len(out) <= limit and (block := f.read(min(8 << 20, limit + 1 - len(out)))):
            out += block
    if len(out) > limit:
        raise TooLargeError(too_large("decompresses to" if fsspec.utils.infer_compression(url) else "holds"))
    return bytes(out)


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


def alias_expansion(root: yaml.Node | None) -> int | None:
    """How many nodes aliases add to the document at ``root`` (each alias counts as the whole
    value it names), in time linear in the document: sizes are memoized per node, without
    recursion. None when an alias refers to a value that contains it (an endless document)."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    extra = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, done = stack.pop()
        kids = [] if isinstance(node, yaml.ScalarNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value)
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            continue
        if id(node) in size:  # seen before: an alias (or a merge key), it adds the whole value again
            extra += size[id(node)]
            if extra > MAX_ALIAS_NODES:
                return extra
            continue
        if id(node) in on_path:
            return None
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in reversed(kids))
    return extra


def _parse_yaml(text: str, label: str, problems: Problems) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.duplicates = []
    try:
        root = loader.get_single_node()  # composed, not constructed: aliases are still references
        extra = alias_expansion(root)
        if extra is None or extra > MAX_ALIAS_NODES:
            why = "alias inside the value it names" if extra is None else f"aliases expand past {MAX_ALIAS_NODES} nodes"
            problems.add(label, f"YAML {why} (jobs.limits.MAX_ALIAS_NODES)")
            return None
        return loader.construct_document(root) if root is not None else None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int of more than 4300 digits
        problems.add(label, f"invalid YAML: {e}")
        return None
    finally:
        for dup in loader.duplicates:
            problems.add(label, dup)
        loader.dispose()


def _parse_json(text: str, label: str, problems: Problems) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict:
        out = dict(items)
        if len(out) < len(items):  # counted once each: keys.count(k) per key was quadratic in the keys
            counts = collections.Counter(k for k, _ in items)
            for key in sorted(k for k, n in counts.items() if n > 1):
                problems.add(label, f"duplicate key '{key}'")
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except ValueError as e:  # JSONDecodeError, or an int of more than 4300 digits
        problems.add(label, f"invalid JSON: {e}")
        return None


def too_many(count: int) -> str:
    return f"{count} jobs (limit {MAX_JOBS} per manifest, jobs.limits.MAX_JOBS)"


def _parse_jsonl(text: str, label: str, problems: Problems) -> list:
    lines = text.splitlines()
    if (count := sum(1 for line in lines if line.strip())) > MAX_JOBS:  # before parsing any
        problems.add(label, too_many(count))
        return []
    jobs = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            before = len(problems)
            job = _parse_json(line, f"{label} line {n}", problems)
            jobs.append(UNPARSED if len(problems) > before and job is None else job)
    return jobs


def _parse_parquet(blob: bytes, label: str, problems: Problems) -> list:
    """One job per row; null cells mean "not given", ``loras`` may be a JSON string."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(io.BytesIO(blob)).metadata
        if meta.num_rows > MAX_JOBS:
            problems.add(label, too_many(meta.num_rows))
            return []
        pages = sum(meta.row_group(g).column(c).total_uncompressed_size
                    for g in range(meta.num_row_groups) for c in range(meta.num_columns))
        if pages > MAX_MANIFEST_BYTES:  # a few compressed kilobytes may hold gigabytes of pages
            problems.add(label, too_large("decompresses to"))
            return []
        schema = meta.schema
        texts = [schema.column(i).path for i in range(len(schema)) if schema.column(i).physical_type == "BYTE_ARRAY"]
        # text columns stay dictionary-encoded until their decoded size is known: one long
        # prompt repeated in a million rows is stored once but would decode a million times
        table = pq.ParquetFile(io.BytesIO(blob), read_dictionary=texts).read()
        if sum(_decoded_bytes(col.chunks) for col in table.columns) > MAX_MANIFEST_BYTES:
            problems.add(label, too_large("decodes to"))
            return []
        rows = table.to_pylist()
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


def _decoded_bytes(arrays: list) -> int:
    """Bytes ``arrays`` hold with every dictionary-encoded value written out, without doing so."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total, stack = 0, list(arrays)
    while stack:
        arr = stack.pop()
        kind = arr.type
        if pa.types.is_dictionary(kind):
            lengths = pc.binary_length(arr.dictionary)
            total += int(pc.sum(pc.take(lengths, arr.indices)).as_py() or 0) + arr.indices.nbytes
        elif pa.types.is_struct(kind):
            stack.extend(arr.field(i) for i in range(kind.num_fields))
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            total += arr.offsets.nbytes
            stack.append(arr.values)
        else:
            total += arr.nbytes
    return total


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
