"""Reading manifests and job files from storage: bytes from any fsspec URL, parsed by format.

YAML (duplicate keys reported, which PyYAML would drop), JSON, JSONL (one job per line; a
bad line is reported and keeps its index) and Parquet (one job per row). Problems are
recorded, never raised, so ``manifest.py`` reports them with every other one. Reading is
bounded (``limits.py``): at most ``MAX_MANIFEST_BYTES`` are read or decompressed; YAML (far
slower to parse than JSON) holds at most ``MAX_YAML_BYTES`` and ``MAX_YAML_NODES``, and its
aliases add at most ``MAX_ALIAS_NODES`` nodes; a Parquet file is checked by its metadata and
by the size its columns decode to before any row becomes a Python value. A read over the network has a
per-read timeout, a byte cap and the rate floor of LoRA downloads (``storage.fetch``). A
``jobs_file`` passes the LoRA URI policy (``storage.policy``) and its YAML errors never
quote its lines: it may be a file the manifest's author cannot read otherwise.
"""
from __future__ import annotations

import collections
import io
import json
import os
import posixpath
import tempfile
from dataclasses import replace
from typing import Any, Mapping

import fsspec
import yaml

from storage import fetch as _fetch
from storage.errors import LoraTooLargeError
from storage.policy import policy_for
from storage.urls import is_local, open_filesystem

from .limits import MAX_ALIAS_NODES, MAX_JOBS, MAX_MANIFEST_BYTES, MAX_NESTING, MAX_YAML_BYTES, MAX_YAML_NODES
from .validate import Problems, at, is_url

#: Stands in for a JSONL line that failed to parse, so later lines keep their index.
UNPARSED: Any = object()
#: Seconds one connect or read of a manifest or jobs file over the network may wait.
READ_TIMEOUT_S = 60.0
#: ``read_jobs_file``'s ``base_dir`` when the caller does not say: only the policy's fixed rules
#: (``DENIED_ROOTS``, protocols, hosts) apply, not the roots.
ANY_ROOT: Any = object()


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
    arrives: a small archive that inflates to gigabytes is cut off, not inflated. A remote
    file is first downloaded as LoRAs are (``storage.fetch.guarded_get``: at most ``limit``
    bytes, cut below the rate floor, ``READ_TIMEOUT_S`` per read): a server that trickles or
    stalls ends the read (``SlowTransferError``) instead of holding validation forever."""
    limit = MAX_MANIFEST_BYTES if limit is None else limit
    fs, path = open_filesystem(url, dict(storage_options or {}), READ_TIMEOUT_S)
    compression = fsspec.utils.infer_compression(url)
    if is_local(fs):
        with fs.open(path, "rb", compression="infer") as f:
            return _read_capped(f, limit, compression)
    with tempfile.TemporaryDirectory(prefix="lora-farm-read-") as tmp:
        local = os.path.join(tmp, "raw")
        guard = _fetch.TransferGuard(url, every=1 << 62, max_bytes=limit, announced=None,
                                     min_rate=_fetch.MIN_RATE_BYTES_S, window_s=_fetch.RATE_WINDOW_S)
        try:
            _fetch.guarded_get(fs, path, local, guard)
        except LoraTooLargeError as e:
            raise TooLargeError(too_large()) from e
        with fsspec.open(local, "rb", compression=compression) as f:
            return _read_capped(f, limit, compression)


def _read_capped(f: Any, limit: int, compression: str | None) -> bytes:
    out = bytearray()
    while len(out) <= limit and (block := f.read(min(8 << 20, limit + 1 - len(out)))):
        out += block
    if len(out) > limit:
        raise TooLargeError(too_large("decompresses to" if compression else "holds"))
    return bytes(out)


def _format_of(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    compression = fsspec.utils.infer_compression(name)
    if compression:
        name = name.rsplit(".", 1)[0]  # jobs.jsonl.gz -> jobs.jsonl
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    return {"yml": "yaml", "ndjson": "jsonl", "pq": "parquet"}.get(ext, ext)


class _UniqueKeys:
    """A SafeLoader mixin that reports duplicate keys (PyYAML would silently keep the last)."""

    duplicates: list[str]
    quote: bool = True

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
            if isinstance(key, str) and key in seen:
                name = f" '{key}'" if self.quote else ""
                self.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key{name}")
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]


class _PyLoader(_UniqueKeys, yaml.SafeLoader):
    pass


#: The loaders here, fastest first: libyaml's parser (where PyYAML was built with it; several
#: times faster) composes the same nodes, so the alias and nesting guards hold for both
#: (``tests/jobs/test_limits.py`` runs them on each); construction is PyYAML's in both.
YAML_LOADERS: tuple[type, ...] = (_PyLoader,)
if getattr(yaml, "__with_libyaml__", False):
    class _CLoader(_UniqueKeys, yaml.CSafeLoader):
        pass

    YAML_LOADERS = (_CLoader, _PyLoader)


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


def _parse_yaml(text: str, label: str, problems: Problems, quote: bool = True,
                loader_class: type | None = None) -> Any:
    """``text`` as YAML; problems under ``label``. ``quote=False``: messages give the line and
    column, never the text (a jobs file may be a file its author may not read)."""
    loader_class = loader_class or YAML_LOADERS[0]
    loader = None
    try:
        nodes, aliases = _count_nodes(loader_class, text)
        if nodes > MAX_YAML_NODES:
            problems.add(label, f"more than {MAX_YAML_NODES} YAML nodes (jobs.limits.MAX_YAML_NODES; set "
                                "LORA_FARM_MAX_YAML_NODES for more, or give a big job list as JSONL or Parquet)")
            return None
        loader = loader_class(text)
        loader.duplicates, loader.quote = [], quote
        root = loader.get_single_node()  # composed, not constructed: aliases are still references
        extra = alias_expansion(root) if aliases else 0
        if extra is None or extra > MAX_ALIAS_NODES:
            why = "alias inside the value it names" if extra is None else f"aliases expand past {MAX_ALIAS_NODES} nodes"
            problems.add(label, f"YAML {why} (jobs.limits.MAX_ALIAS_NODES)")
            return None
        return loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        if "exceeded maximum nesting depth" in str(e):  # libyaml's own limit (1000 levels)
            raise RecursionError(str(e)) from e
        problems.add(label, f"invalid YAML: {_yaml_reason(e, text, quote)}")
        return None
    except ValueError as e:  # an int of more than 4300 digits
        problems.add(label, f"invalid YAML: {e}")
        return None
    finally:
        if loader is not None:
            for dup in loader.duplicates:
                problems.add(label, dup)
            loader.dispose()


_NODE_EVENTS = (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent, yaml.AliasEvent)
_OPEN_EVENTS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE_EVENTS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _count_nodes(loader_class: type, text: str) -> tuple[int, bool]:
    """``(nodes, any alias)`` of ``text``, from the parser's event stream (nothing is built, memory
    stays flat), counted no further than ``MAX_YAML_NODES + 1``; ``RecursionError`` past
    ``MAX_NESTING`` levels (PyYAML's scanner costs depth squared). Raises what parsing raises."""
    events, nodes, aliases, depth = loader_class(text), 0, False, 0  # the reader checks every character here
    try:
        while nodes <= MAX_YAML_NODES and events.check_event():
            event = events.get_event()
            if isinstance(event, _NODE_EVENTS):
                nodes, aliases = nodes + 1, aliases or isinstance(event, yaml.AliasEvent)
            depth += isinstance(event, _OPEN_EVENTS) - isinstance(event, _CLOSE_EVENTS)
            if depth > MAX_NESTING:
                raise RecursionError(f"YAML nested more than {MAX_NESTING} levels")
    finally:
        events.dispose()
    return nodes, aliases


def _yaml_reason(e: yaml.YAMLError, text: str, quote: bool) -> str:
    """Why the YAML is invalid: PyYAML's message (which quotes the lines), or with ``quote=False``
    only what is wrong and where."""
    if isinstance(e, yaml.reader.ReaderError):  # a control character: where, as line and column
        # the reader stops at the first one; libyaml's position counts UTF-8 bytes, PyYAML's characters
        pos = text.find(chr(e.character)) if isinstance(e.character, int) else -1
        pos = e.position if pos < 0 else pos
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return (f"unacceptable character #x{e.character:04x} at line {line}, column {column}: "
                "control characters are not allowed in YAML")
    if quote or not isinstance(e, yaml.MarkedYAMLError):
        return str(e) if quote else type(e).__name__
    mark = e.problem_mark or e.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(part for part in (e.context, e.problem) if part) + where


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


def parse(url: str, blob: bytes, label: str, problems: Problems, *, quote: bool = True) -> Any:
    """``blob`` parsed by the format ``url``'s name says; None (problem recorded under ``label``) if
    it is not. ``quote=False``: no message quotes the file's text (a ``jobs_file``)."""
    fmt = _format_of(url)
    if fmt == "parquet":
        return _parse_parquet(blob, label, problems)
    if fmt not in ("json", "jsonl") and len(blob) > MAX_YAML_BYTES:  # before decoding: YAML is the costly one
        problems.add(label, f"{len(blob) / (1 << 20):.1f} MiB of YAML, more than {MAX_YAML_BYTES >> 20} MiB "
                            "(jobs.limits.MAX_YAML_BYTES; set LORA_FARM_MAX_YAML_MB for more, or give a big job "
                            "list as JSONL or Parquet: jobs_file: jobs.jsonl)")
        return None
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add(label, f"not UTF-8 text: {e}" if quote else f"not UTF-8 text (byte {e.start})")
        return None
    try:
        if fmt == "jsonl":
            return _parse_jsonl(text, label, problems)
        if fmt == "json":
            return _parse_json(text, label, problems)
        return _parse_yaml(text, label, problems, quote)  # .yaml, .yml and anything else (JSON is YAML)
    except RecursionError:  # the parsers recurse per level: a document nested thousands deep
        problems.add(label, f"nested too deeply to parse (a manifest may nest {MAX_NESTING} levels)")
        return None


def read_jobs_file(url: str, storage_options: Mapping | None, problems: Problems, base_dir: Any = ANY_ROOT) -> Any:
    """The job list of a ``jobs_file:`` (a bare list, or a mapping with only ``jobs``); None if
    unreadable, refused by the URI policy of a manifest in ``base_dir``, or not a job list.
    A YAML error quotes none of its lines; a JSON duplicate key and the job checks' refused values
    are named, as for a manifest."""
    # the LoRA URI policy of a manifest in base_dir; without one (ANY_ROOT), that policy's fixed rules only
    policy = replace(policy_for(None), roots=("/",)) if base_dir is ANY_ROOT else policy_for(base_dir)
    refused = policy.refusal(url)
    if refused is not None:
        problems.add("jobs_file", f"refused by the farm's URI policy (as for LoRAs): {refused}")
        return None
    try:
        blob = read_bytes(url, policy.guard(storage_options))  # redirects pass the same policy
    except Exception as e:  # noqa: BLE001 - any storage failure is a manifest problem here
        problems.add("jobs_file", f"cannot read {url}: {type(e).__name__}: {e}")
        return None
    data = parse(url, blob, "jobs_file", problems, quote=False)
    if isinstance(data, Mapping) and set(data) == {"jobs"}:
        data = data["jobs"]
    if data is not None and not isinstance(data, (list, tuple)):
        problems.add("jobs_file", f"{url} holds no job list (got a {type(data).__name__}): a list of jobs, "
                                  "or a mapping with only 'jobs'")
        return None
    return data


def base_dir_of(url: str) -> str:
    """The directory (or URL prefix) that relative paths in the manifest at ``url`` refer to."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if is_url(url):
        return posixpath.dirname(url.rstrip("/"))
    return os.path.dirname(os.path.abspath(os.path.expanduser(url)))


__all__ = ["ANY_ROOT", "READ_TIMEOUT_S", "UNPARSED", "YAML_LOADERS", "base_dir_of", "filesystem", "parse",
           "read_bytes", "read_jobs_file"]
