"""FARM.yaml: the pools of workers a farm keeps up, where it records runs, and who weighs what.

```yaml
pools:
  - {name: qwen, model: {backend: tiny}, workers: 2}   # workers: N | per_gpu; gpus_per_worker: 1
state: /var/lib/lora-farm          # any fsspec URL: runs recorded here survive restarts
submitters: {alice: 1, bob: 2}     # optional weights for fair share (default 1)
fair_share: true                   # optional: false serves runs of equal priority by affinity alone
lora_roots: [/data/loras]          # optional: local dirs the farm's workers may read LoRA files from
```

Validated like a manifest, with the manifest's own checks (``jobs/validate.py``): every
problem is collected with its field path and reported at once (``FarmConfigError``), and
reading is bounded like a manifest's (``jobs/sources.py``). A pool's ``model`` is checked by
the manifest's ``check_model``, so a manifest whose ``model`` is written the same way as a
pool's normalizes to the same dict and ``FarmConfig.pool_for`` finds that pool.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from jobs.limits import Problems, ProblemsError, check_document
from jobs.options import FarmOptions, option_fields
from jobs.sources import base_dir_of, parse, read_bytes
from jobs.validate import (
    BAD, at, check_bool, check_fields, check_int, check_list, check_mapping, check_model, check_number,
    check_options, check_output, check_storage_options, check_str, describe, is_url, resolve_path,
)

__all__ = [
    "FarmConfigError", "PoolConfig", "FarmConfig", "parse_farm_config", "load_farm_config",
    "canonical_model", "POOL_NAME_RE", "MAX_WORKERS", "MAX_GPUS_PER_WORKER", "PER_GPU",
]

#: Pool names show up in worker ids, actor names and ``farm workers`` output.
POOL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
#: ``workers: N`` at most this many per pool (a typo like 2000 should not start 2000 actors).
MAX_WORKERS = 256
#: GPUs one worker may ask for (a node rarely has more).
MAX_GPUS_PER_WORKER = 8.0
#: ``workers: per_gpu``: as many workers as the cluster's GPUs hold (``PoolConfig.worker_count``).
PER_GPU = "per_gpu"

TOP_FIELDS = ("pools", "state", "submitters", "fair_share", "storage_options", "lora_roots")
POOL_FIELDS = ("name", "model", "workers", "gpus_per_worker", "adapter_cache_mb",
               "node_cache_dir", "node_cache_mb", "options")
_OPTION_NAMES = tuple(f.name for f in option_fields())


class FarmConfigError(ProblemsError):
    """A farm config that cannot run; ``problems`` holds every ``"field.path: reason"`` found."""


def canonical_model(model: Mapping[str, Any]) -> str:
    """The one string two model specs share exactly when they name the same model: sorted-key
    JSON of the validated spec (``str`` for anything JSON cannot hold, e.g. a YAML date in ``args``)."""
    return json.dumps(dict(model), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _normalized_model(model: Any) -> dict | None:
    """``model`` as manifest validation leaves it (``{}`` -> ``{"backend": "tiny"}``), or None if invalid.

    Validated specs pass through unchanged (``check_model`` is idempotent on its own output),
    so both a ``Manifest.model`` and a raw ``{backend: tiny}`` can be matched against a pool.
    """
    problems = Problems()
    out = check_model(model, "model", problems, None)
    return None if len(problems) else out


@dataclass(frozen=True)
class PoolConfig:
    """One pool: ``workers`` workers that each hold ``model`` (and its LoRA caches)."""

    name: str                      # POOL_NAME_RE; unique among pools
    model: dict                    # the validated manifest model spec (a path made absolute)
    workers: int | str             # 1..MAX_WORKERS, or PER_GPU
    gpus_per_worker: float = 1.0   # 0 (a CPU worker) .. MAX_GPUS_PER_WORKER; fractions allowed
    adapter_cache_mb: int = 2048   # the worker's in-memory adapter budget
    node_cache_dir: str | None = None   # the node-local LoRA file cache dir (may contain "{node}")
    node_cache_mb: int | None = None    # its budget (None: the store's default)
    #: the farm options the config sets for this pool's workers, only those it names
    #: (validated like a manifest's ``options``); ``farm_options()`` fills in the rest
    options: dict = field(default_factory=dict)

    def worker_count(self, cluster_gpus: float) -> int:
        """How many workers to run: ``workers`` as given, or for ``per_gpu`` as many as
        ``cluster_gpus`` hold at ``gpus_per_worker`` each (rounded down), and at least 1."""
        if self.workers != PER_GPU:
            return int(self.workers)
        if not self.gpus_per_worker > 0:
            raise ValueError(f"pool '{self.name}': workers: per_gpu needs gpus_per_worker > 0 "
                             f"(got {self.gpus_per_worker!r})")
        # the epsilon keeps 0.6 GPUs at 0.2 each at 3 workers (0.6 / 0.2 is 2.9999999999999996)
        return max(1, math.floor(max(0.0, float(cluster_gpus)) / self.gpus_per_worker + 1e-9))

    def serves(self, model: Mapping[str, Any]) -> bool:
        """True when ``model`` (a manifest's model spec, validated or as written) is this pool's.

        A spec validation refuses matches only a pool built in code with that very spec (the
        measurement backends of ``testsupport``, which benchmarks give a farm directly)."""
        other = _normalized_model(model)
        return canonical_model(dict(model) if other is None else other) == canonical_model(self.model)

    def farm_options(self) -> FarmOptions:
        """The pool's ``options`` over the farm defaults."""
        return FarmOptions(**self.options)

    def to_dict(self) -> dict[str, Any]:
        """The pool in FARM.yaml syntax (unset optional fields left out)."""
        out: dict[str, Any] = {
            "name": self.name, "model": dict(self.model), "workers": self.workers,
            "gpus_per_worker": self.gpus_per_worker, "adapter_cache_mb": self.adapter_cache_mb,
        }
        if self.node_cache_dir is not None:
            out["node_cache_dir"] = self.node_cache_dir
        if self.node_cache_mb is not None:
            out["node_cache_mb"] = self.node_cache_mb
        if self.options:
            out["options"] = dict(self.options)
        return out


@dataclass(frozen=True)
class FarmConfig:
    """A whole FARM.yaml. Plain tuples and dicts only, so it pickles across Ray unchanged."""

    pools: tuple[PoolConfig, ...]   # at least one; names unique, models distinct
    state: str                      # the state root: an fsspec URL or an absolute local dir
    submitters: Mapping[str, float] = field(default_factory=dict)   # weight > 0; unlisted: 1
    #: for the state root's protocol, in a manifest's shape; may hold secrets, so kept out of repr
    storage_options: dict = field(default_factory=dict, repr=False)
    #: local directories LoRA files may be read from (absolute), on top of ``$LORA_FARM_LORA_ROOTS``;
    #: a submitted manifest's own directory is not one (on a shared farm it would allow any path)
    lora_roots: tuple[str, ...] = ()
    #: share workers between submitters by weight among runs of equal priority (``farm.scheduler.fair``);
    #: False: the affinity rules alone (the run whose compositions take longest to clear goes first)
    fair_share: bool = True

    def pool_for(self, model: Mapping[str, Any]) -> PoolConfig | None:
        """The pool whose model is ``model`` (validation keeps pool models distinct), or None."""
        return next((pool for pool in self.pools if pool.serves(model)), None)

    def pool(self, name: str) -> PoolConfig | None:
        """The pool called ``name``, or None."""
        return next((pool for pool in self.pools if pool.name == name), None)

    def weight(self, submitter: str) -> float:
        """``submitter``'s fair-share weight: as configured, else 1."""
        return float(self.submitters.get(submitter, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """The config in FARM.yaml syntax: ``parse_farm_config(c.to_dict()) == c``."""
        out: dict[str, Any] = {"pools": [pool.to_dict() for pool in self.pools], "state": self.state}
        if self.submitters:
            out["submitters"] = dict(self.submitters)
        if not self.fair_share:
            out["fair_share"] = False
        if self.storage_options:
            out["storage_options"] = {proto: dict(opts) for proto, opts in self.storage_options.items()}
        if self.lora_roots:
            out["lora_roots"] = list(self.lora_roots)
        return out


# ---- validation --------------------------------------------------------------------------
def _absolute(where: str, base_dir: str | None) -> str:
    """A local path made absolute against ``base_dir`` (the config's dir; else the working dir).

    The controller may run with another working directory than the one ``farm up`` ran in,
    so no relative local path survives validation; URLs are kept as written.
    """
    where = resolve_path(where, base_dir)
    return where if is_url(where) else os.path.abspath(where)


def _check_model(raw: Any, path: str, problems: Problems, base_dir: str | None) -> dict:
    if raw is None:
        problems.add(path, "required (e.g. {backend: tiny})")
        return {"backend": "tiny"}
    model = check_model(raw, path, problems, base_dir)
    if isinstance(model.get("path"), str) and model["path"] is not BAD:
        model["path"] = _absolute(model["path"], None)
    return model


def _check_workers(raw: Any, path: str, problems: Problems) -> int | str | Any:
    if isinstance(raw, str):
        if raw.strip() == PER_GPU:
            return PER_GPU
        problems.add(path, f"must be an integer 1..{MAX_WORKERS} or '{PER_GPU}' {describe(raw)}")
        return BAD
    return check_int(raw, path, problems, 1, MAX_WORKERS)


def _check_gpus(raw: Any, path: str, problems: Problems) -> float | Any:
    gpus = check_number(raw, path, problems, 0)
    if gpus is not BAD and gpus > MAX_GPUS_PER_WORKER:
        problems.add(path, f"must be <= {MAX_GPUS_PER_WORKER:g} {describe(raw)}")
        return BAD
    return gpus


def _check_cache_dir(raw: Any, path: str, problems: Problems, base_dir: str | None) -> str | Any:
    where = check_str(raw, path, problems, nonempty=True)
    if where is BAD:
        return BAD
    where = where.strip()
    if is_url(where):
        problems.add(path, f"must be a local directory on each node, not a URL {describe(raw)}")
        return BAD
    try:
        where.format(node="n")  # the worker fills in "{node}" with str.format
    except (KeyError, IndexError, ValueError) as e:
        problems.add(path, f"only the placeholder {{node}} may appear in braces ({type(e).__name__}: {e})")
        return BAD
    return _absolute(where, base_dir)


def _check_pool_options(raw: Any, path: str, problems: Problems) -> dict:
    """The options the pool names (validated as a manifest's), not the defaults it leaves."""
    start = len(problems)
    checked = check_options(raw, path, problems)
    if len(problems) > start or not isinstance(raw, Mapping):
        return {}
    return {name: getattr(checked, name) for name in _OPTION_NAMES if raw.get(name) is not None}


def _check_pool(raw: Any, path: str, problems: Problems, base_dir: str | None) -> PoolConfig | None:
    raw = check_mapping(raw, path, problems)
    if raw is BAD:
        return None
    start = len(problems)
    check_fields(raw, POOL_FIELDS, path, problems)

    def given(name: str) -> bool:
        return raw.get(name) is not None  # "key:" with no value = absent, as in manifests

    name = BAD
    if not given("name"):
        problems.add(at(path, "name"), "required")
    else:
        name = check_str(raw["name"], at(path, "name"), problems, nonempty=True)
        if name is not BAD and not POOL_NAME_RE.match(name):
            problems.add(at(path, "name"), f"invalid pool name {name!r}: use 1-32 of a-z 0-9 _ -, "
                                           "starting with a letter or digit")
            name = BAD
    model = _check_model(raw.get("model"), at(path, "model"), problems, base_dir)
    workers = _check_workers(raw["workers"], at(path, "workers"), problems) if given("workers") else 1
    gpus = _check_gpus(raw["gpus_per_worker"], at(path, "gpus_per_worker"), problems) \
        if given("gpus_per_worker") else 1.0
    if workers == PER_GPU and gpus is not BAD and gpus == 0:
        problems.add(at(path, "workers"), "per_gpu needs gpus_per_worker > 0 (a CPU pool names its worker count)")
    adapter_mb = check_int(raw["adapter_cache_mb"], at(path, "adapter_cache_mb"), problems, 1) \
        if given("adapter_cache_mb") else 2048
    cache_dir = _check_cache_dir(raw["node_cache_dir"], at(path, "node_cache_dir"), problems, base_dir) \
        if given("node_cache_dir") else None
    cache_mb = check_int(raw["node_cache_mb"], at(path, "node_cache_mb"), problems, 1) \
        if given("node_cache_mb") else None
    options = _check_pool_options(raw["options"], at(path, "options"), problems) if given("options") else {}
    if len(problems) > start:
        return None
    return PoolConfig(name=name, model=model, workers=workers, gpus_per_worker=float(gpus),
                      adapter_cache_mb=adapter_mb, node_cache_dir=cache_dir, node_cache_mb=cache_mb,
                      options=options)


def _check_pools(raw: Any, problems: Problems, base_dir: str | None) -> list[PoolConfig]:
    if raw is None:
        problems.add("pools", "required: at least one pool, e.g. [{name: main, model: {backend: tiny}, workers: 1}]")
        return []
    items = check_list(raw, "pools", problems, nonempty=True)
    if items is BAD:
        return []
    if len(items) > MAX_WORKERS:  # every pool has a worker: more pools than workers allowed is a typo
        problems.add("pools", f"{len(items)} pools (at most {MAX_WORKERS})")
        return []
    pools: list[PoolConfig] = []
    names: dict[str, str] = {}
    models: dict[str, str] = {}
    for i, item in enumerate(items):
        path = at("pools", i)
        pool = _check_pool(item, path, problems, base_dir)
        if pool is None:
            continue
        if pool.name in names:
            problems.add(at(path, "name"), f"duplicate pool name '{pool.name}' (also {names[pool.name]})")
            continue
        key = canonical_model(pool.model)
        if key in models:
            problems.add(at(path, "model"), f"same model as {models[key]}: a manifest's model picks its "
                                            "pool, so each pool needs a model of its own")
            continue
        names[pool.name], models[key] = path, f"{path} ('{pool.name}')"
        pools.append(pool)
    return pools


def _check_state(raw: Any, problems: Problems, base_dir: str | None) -> str:
    if raw is None:
        problems.add("state", "required: the state root (a local dir or any fsspec URL) where runs are recorded")
        return ""
    state = check_output(raw, "state", problems, base_dir)
    return _absolute(state, None) if state else ""


def _check_submitters(raw: Any, problems: Problems) -> dict[str, float]:
    items = check_mapping(raw, "submitters", problems)
    if items is BAD:
        return {}
    out: dict[str, float] = {}
    for name, weight in items.items():
        if not isinstance(name, str) or not name.strip():
            problems.add("submitters", f"a submitter name must be a non-empty string {describe(name)}")
            continue
        path = at("submitters", name)
        value = check_number(weight, path, problems, 0)
        if value is not BAD and value == 0:
            problems.add(path, "must be > 0 (a weight of 0 would never be served)")
        elif value is not BAD:
            out[name] = value
    return out


def _check_roots(raw: Any, problems: Problems, base_dir: str | None) -> tuple[str, ...]:
    items = check_list(raw, "lora_roots", problems)
    if items is BAD:
        return ()
    roots = []
    for i, item in enumerate(items):
        path = at("lora_roots", i)
        where = check_str(item, path, problems)
        if where is BAD:
            continue
        if is_url(where):
            problems.add(path, "must be a local directory (remote LoRAs are allowed by protocol, not by root)")
            continue
        roots.append(_absolute(where, base_dir))
    return tuple(roots)


def _parse(data: Any, base_dir: str | None, problems: Problems) -> FarmConfig:
    check_document(data, "config", problems, FarmConfigError)
    check_fields(data, TOP_FIELDS, "config", problems)
    pools = _check_pools(data.get("pools"), problems, base_dir)
    state = _check_state(data.get("state"), problems, base_dir)
    submitters = _check_submitters(data["submitters"], problems) if data.get("submitters") is not None else {}
    storage_options = check_storage_options(data["storage_options"], "storage_options", problems) \
        if data.get("storage_options") is not None else {}
    roots = _check_roots(data["lora_roots"], problems, base_dir) if data.get("lora_roots") is not None else ()
    fair = check_bool(data["fair_share"], "fair_share", problems) if data.get("fair_share") is not None else True
    if len(problems):
        raise FarmConfigError(problems.items)
    return FarmConfig(pools=tuple(pools), state=state, submitters=submitters, storage_options=storage_options,
                      lora_roots=roots, fair_share=fair)


def parse_farm_config(data: Any, base_dir: str | None = None) -> FarmConfig:
    """A ``FarmConfig`` from parsed YAML/JSON, or ``FarmConfigError`` listing every problem.

    ``base_dir`` (the config file's directory) anchors relative local paths (a model's
    ``path``, ``node_cache_dir``, ``state``); without it they are made absolute against the
    working directory.
    """
    return _parse(data, base_dir, Problems())


def load_farm_config(path: str) -> FarmConfig:
    """Read and validate FARM.yaml (or .json) from a local path or an fsspec URL.

    Read like a manifest: at most ``jobs.limits.MAX_MANIFEST_BYTES``, YAML aliases bounded,
    duplicate keys reported. Unreadable or unparsable files raise ``FarmConfigError`` too.
    """
    url = os.fspath(path)
    try:
        blob = read_bytes(url, None)
    except Exception as e:  # noqa: BLE001 - reported as a config problem
        raise FarmConfigError([f"{url}: cannot read: {type(e).__name__}: {e}"]) from e
    problems = Problems()
    data = parse(url, blob, url, problems)
    if data is None:
        raise FarmConfigError(problems.items or [f"{url}: empty farm config"])
    # parse-level problems (duplicate keys) are reported with the rest
    return _parse(data, base_dir_of(url), problems)
