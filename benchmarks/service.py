"""A warm farm against one `farm run` per manifest: what staying up buys a stream of manifests.

``python -m benchmarks.service [--manifests 5] [--jobs-per 6] [--compositions 3] [--workers 2]
[--render-s 0.2] [--compose-s 0.5] [--load-s 0 30] [--slow-manifests 3] [--tiny-manifests 2]
[--json] [--write-results]``

A stream of K small manifests that share compositions (each manifest: ``jobs-per`` jobs spread
over the same ``compositions`` LoRA lists of real files, its own prompts, seeds and output),
submitted one after another, each when the one before finished (a user running one manifest
after another), two ways, in one run, per model load time L:

* **one-shot** (what `farm run` does per manifest): fresh ``RayRenderWorker`` actors, the
  model loaded on their first call, ``Dispatcher.run``, the actors killed. Built by hand like
  ``farm.runner.run_manifest`` (which cannot take the sleep backend's factory); the Ray
  cluster stays up between manifests, so the one-shot figures leave out the cluster start a
  `farm run` without ``--address`` also pays (reported once, as ``ray_start_s``).
* **warm farm**: one ``FarmController`` (``farm.service``) brought up once before the stream
  (its up time reported on its own), every manifest submitted to it as a ``Manifest`` object
  and followed like ``farm submit --wait`` does (``status`` until ``done``).

L is the sleep backend's ``load_s`` (building the backend sleeps L once: 0, its own build; 30
s, a real model's order), plus, with ``--tiny-manifests`` > 0, a row set with the real tiny
Qwen-Image backend (``load "tiny (real)"``: a real model load, compose and render).

Per manifest: time to first image and to last image, from its submit to its rows'
``finished_at`` (stamped when the dispatcher records the row, after the worker wrote the
PNG); its wall time (one-shot: start to the actors killed; warm: submit to ``done`` seen);
composition switches from the workers' own ``state()`` counters; model loads. Targets,
checked in ``targets``: the warm farm's time to first image for manifests 2..K at most 1.1 x
(R x first batch + the measured dispatch overhead), and no composition the farm held at a
manifest's submit composed again during it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from benchmarks import sim_validate
from benchmarks.common import machine, write_section

TITLE = "Farm service"
#: Warm farm time to first image may be this much over one render of its first batch plus dispatch.
FIRST_IMAGE_SLACK = 1.1
#: Loads at or above this many seconds use ``--slow-manifests`` (each one-shot manifest pays L).
SLOW_LOAD_S = 10.0
PROBES = 3  # one-job runs on the warm farm that measure its dispatch overhead
POLL_S = 0.02  # how often the benchmark asks the controller whether a run is done
TIMEOUT_S = 600.0  # a run on the warm farm
UP_TIMEOUT_S = 120.0  # the farm's workers ready, on top of twice the model's load_s
TINY = "tiny (real)"


# ---- the workload (pure) -------------------------------------------------------------------
def compositions_of(files: Sequence[str], n: int) -> list[tuple[tuple[str, float], ...]]:
    """``n`` distinct LoRA lists over ``files``: composition c is files c and c+1 (cyclic; file c
    alone when there is one file), both at strength ``0.5 + 0.05 c``, so no two are alike."""
    if not files:
        raise ValueError("compositions_of: no LoRA files given")
    k = len(files)
    out = []
    for c in range(n):
        s = round(0.5 + 0.05 * c, 6)
        out.append(((files[c % k], s),) if k == 1 else ((files[c % k], s), (files[(c + 1) % k], s)))
    return out


def make_manifests(k: int, jobs_per: int, comps: Sequence[tuple[tuple[str, float], ...]], model: dict,
                   out_root: str, *, steps: int = 2, size: int = 64) -> list:
    """``k`` manifests of ``jobs_per`` jobs each, job j on composition ``j % len(comps)``;
    prompts, seeds, ids and outputs differ per manifest (``out_root/m<i>``)."""
    from jobs.manifest import Job, LoraRef, Manifest

    manifests = []
    for i in range(k):
        jobs = tuple(Job(f"m{i}-j{j}", f"manifest {i} prompt {j}", 1000 * i + j,
                         tuple(LoraRef(uri, s) for uri, s in comps[j % len(comps)]), steps, size, size, 1.0)
                     for j in range(jobs_per))
        manifests.append(Manifest(model=dict(model), output=os.path.join(out_root, f"m{i}"), storage_options={},
                                  jobs=jobs))
    return manifests


def first_batch(max_batch: int, capacity: int) -> int:
    """Images in the dispatcher's first call to a worker (``Dispatcher._send``'s chunk)."""
    return min(max_batch, max(1, capacity // 2))


# ---- what a run's rows and counters say (pure) ---------------------------------------------
def image_times(t_submit: float, rows: Sequence[Any]) -> tuple[float, float]:
    """Seconds from ``t_submit`` (unix) to the first and the last ok row's ``finished_at``."""
    done = sorted(r.finished_at for r in rows if r.status == "ok")
    if not done:
        raise RuntimeError("no image was rendered")
    return done[0] - t_submit, done[-1] - t_submit


def compose_events(rows: Sequence[Any]) -> set[tuple[str, str, float]]:
    """The compositions a run's rows record: ``(worker, composition key, compose seconds)``
    of rows whose call composed (``compose_s`` > 0; the rows of one batch share the three)."""
    return {(r.worker_id, r.composition_key, r.compose_s) for r in rows if r.status == "ok" and r.compose_s > 0}


def held_recomposed(rows: Sequence[Any], held: set[str]) -> int:
    """How often a composition in ``held`` (held by some worker at submit) was composed again."""
    return sum(1 for _, key, _ in compose_events(rows) if key in held)


def count(states: Sequence[dict], key: str) -> int:
    return sum(int(s.get(key, 0) or 0) for s in states)


def probe_overhead(t_submit: float, row: Any) -> float:
    """A one-job run's seconds beyond its worker's own fetch, compose and render: the dispatch."""
    return (row.finished_at - t_submit) - row.fetch_s - row.compose_s - row.render_s


# ---- Ray -------------------------------------------------------------------------------------
def start_ray(gpus: int) -> tuple[bool, float]:
    """A local cluster on loopback with ``gpus`` logical GPUs unless one is up: (started here, seconds)."""
    t0 = time.perf_counter()
    started = sim_validate.start_ray(gpus, namespace="lora-farm")
    return started, (time.perf_counter() - t0) if started else 0.0


def wait_gpus_free(timeout_s: float = 60.0) -> None:
    """Until every GPU of the cluster is free again (``ray.kill`` gives them back asynchronously)."""
    import ray

    total = float(ray.cluster_resources().get("GPU", 0))
    deadline = time.monotonic() + timeout_s
    while float(ray.available_resources().get("GPU", 0)) < total - 1e-6:
        if time.monotonic() > deadline:
            raise RuntimeError(f"killed workers still hold GPUs after {timeout_s:.0f} s: "
                               f"{ray.available_resources().get('GPU', 0)} of {total} free")
        time.sleep(0.05)


# ---- (a) one-shot: what `farm run` does, per manifest ---------------------------------------
def one_shot(m: Any, workers: int, *, roots: Sequence[str], cache_dir: str, factory: Callable | None) -> dict:
    """``m`` on fresh workers as ``farm.runner.run_manifest`` runs it (start, dispatch, kill)."""
    import ray

    from farm.cluster import make_workers
    from farm.dispatcher import Dispatcher
    from farm.scheduler.affinity import AffinityScheduler
    from jobs.results import ResultsWriter
    from storage.policy import operator_policy

    gpus = float(ray.cluster_resources().get("GPU", 0))
    t_submit = time.time()
    writer = ResultsWriter(m.output, m.storage_options)
    rows: list = []
    opts: dict[str, Any] = dict(options=m.options, storage_options=m.storage_options, cache_dir=cache_dir,
                                uri_policy=operator_policy(m.base_dir, roots))
    if factory is not None:  # the actors are other processes: the sleep backend comes as a factory
        opts["backend_factory"] = factory
    handles = make_workers(workers, m.model, worker_options=opts, num_gpus=min(1.0, gpus / workers) if gpus else 0)
    try:
        named = {f"w{i}": h for i, h in enumerate(handles)}
        node_of = dict(zip(named, ray.get([h.node.remote() for h in handles])))
        d = Dispatcher(named, AffinityScheduler(), m.output, storage_options=m.storage_options, node_of=node_of,
                       retries=m.options.retries, capacity=2, on_rows=rows.extend, max_batch=m.options.max_batch)
        stats = d.run(list(m.jobs))
        states = ray.get([h.state.remote() for h in handles])  # the counters, before the actors go
    finally:
        try:
            if rows:
                writer.append(rows)
            writer.finalize()
        finally:
            for h in handles:
                try:
                    ray.kill(h)
                except Exception:  # noqa: BLE001 - already gone
                    pass
    t_end = time.time()
    if stats.ok != len(m.jobs):
        raise RuntimeError(f"one-shot {m.output}: {stats.ok} of {len(m.jobs)} ok: "
                           f"{[r.error for r in rows if r.status != 'ok'][:3]}")
    first, last = image_times(t_submit, rows)
    return {"first_image_s": first, "last_image_s": last, "wall_s": t_end - t_submit, "jobs": len(m.jobs),
            "ok": stats.ok, "compositions": count(states, "compositions"), "model_loads": count(states, "model_loads"),
            "compose_events": len(compose_events(rows))}


def one_shot_stream(manifests: Sequence[Any], workers: int, **kw) -> dict:
    runs = []
    for m in manifests:
        runs.append(one_shot(m, workers, **kw))
        wait_gpus_free()  # the next `farm run` starts on a free cluster; not timed
    return {"manifests": runs, "stream_wall_s": sum(r["wall_s"] for r in runs),
            "model_loads": sum(r["model_loads"] for r in runs),
            "compositions_first": runs[0]["compositions"],
            "cross_manifest_recompositions": sum(r["compositions"] for r in runs[1:])}


# ---- (b) a warm farm -------------------------------------------------------------------------
@dataclass
class WarmFarm:
    """A controller brought up for the benchmark and taken down after it."""

    handle: Any
    up_s: float

    @classmethod
    def up(cls, pool: Any, state_dir: str, roots: Sequence[str], factory: Callable | None = None,
           **config: Any) -> "WarmFarm":
        """Start the controller with ``pool`` (its workers built by ``factory`` when given: the
        sleep backend, which no manifest may name) and wait until every worker has its model.
        ``config``: more ``FarmConfig`` fields (``submitters``, ``fair_share``)."""
        import ray

        from farm.service.actors import controller_handle, start_controller
        from farm.service.config import FarmConfig

        if controller_handle() is not None:
            raise RuntimeError("a farm is already up on this Ray cluster; the benchmark brings up its own")
        t0 = time.perf_counter()
        h = start_controller(FarmConfig(pools=(pool,), state=state_dir, lora_roots=tuple(roots), **config),
                             backend_factories={pool.name: factory} if factory is not None else None)
        farm = cls(h, 0.0)
        try:
            limit = UP_TIMEOUT_S + 2 * float(pool.model.get("load_s", 0) or 0)
            deadline = time.monotonic() + limit
            while not (st := ray.get(h.ready.remote()))["ready"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the farm's workers were not ready after {limit:.0f} s ({st['workers']} "
                                       "[ready, wanted]); a worker that could not load its model is in the "
                                       "controller's log")
                time.sleep(POLL_S)
        except BaseException:
            farm.down()
            raise
        farm.up_s = time.perf_counter() - t0
        return farm

    def workers(self) -> list[dict]:
        import ray

        return ray.get(self.handle.workers.remote())

    def run(self, m: Any) -> dict:
        """Submit ``m``, follow it to ``done`` like ``farm submit --wait``; its rows and timings."""
        import ray

        from jobs.results import read_results

        t_submit = time.time()
        run_id = ray.get(self.handle.submit.remote(m))["run_id"]
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            st = ray.get(self.handle.status.remote(run_id))
            if st["state"] in ("done", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} not done after {TIMEOUT_S:.0f} s: {st}")
            time.sleep(POLL_S)
        t_done = time.time()
        rows = read_results(m.output)
        if st["state"] != "done" or st["ok"] != len(m.jobs):
            raise RuntimeError(f"warm farm run {run_id}: {st['state']}, {st['ok']} of {len(m.jobs)} ok: "
                               f"{[r.error for r in rows if r.status != 'ok'][:3]}")
        return {"t_submit": t_submit, "wall_s": t_done - t_submit, "rows": rows}

    def down(self) -> None:
        import ray

        try:
            ray.get(self.handle.shutdown.remote(True), timeout=120)
        finally:
            ray.kill(self.handle, no_restart=True)


def warm_stream(manifests: Sequence[Any], pool: Any, *, state_dir: str, roots: Sequence[str], probe_dir: str,
                factory: Callable | None = None) -> dict:
    """The stream on one warm farm: up (timed on its own), dispatch probes, then the manifests."""
    from jobs.manifest import Job, Manifest
    from lora_core import BASE_KEY

    farm = WarmFarm.up(pool, state_dir, roots, factory)
    try:
        at_up = farm.workers()
        j0 = manifests[0].jobs[0]
        overheads = []
        for i in range(PROBES):  # one base-model job each: no LoRA, no composition, nothing to fetch
            probe = Manifest(model=dict(pool.model), output=os.path.join(probe_dir, f"p{i}"), storage_options={},
                             jobs=(Job(f"probe{i}", "probe", i, (), j0.steps, j0.width, j0.height, 1.0),))
            r = farm.run(probe)
            overheads.append(probe_overhead(r["t_submit"], r["rows"][0]))
        before = farm.workers()
        runs, marks = [], [before]
        for m in manifests:
            held = {w["composition"] for w in marks[-1]} - {None, BASE_KEY}
            r = farm.run(m)
            rows = r.pop("rows")
            marks.append(farm.workers())
            first, last = image_times(r["t_submit"], rows)
            head = min((x for x in rows if x.status == "ok"), key=lambda x: x.finished_at)
            runs.append({"first_image_s": first, "last_image_s": last, "wall_s": r["wall_s"], "jobs": len(m.jobs),
                         "done_lag_s": r["wall_s"] - last,
                         "first_row": {"worker": head.worker_id, "fetch_s": head.fetch_s, "compose_s": head.compose_s,
                                       "render_s": head.render_s},
                         "ok": sum(x.status == "ok" for x in rows),
                         "compositions": count(marks[-1], "compositions") - count(marks[-2], "compositions"),
                         "model_loads": count(marks[-1], "model_loads") - count(marks[-2], "model_loads"),
                         "compose_events": len(compose_events(rows)),
                         "held_at_submit": len(held), "held_recomposed": held_recomposed(rows, held)})
    finally:
        farm.down()
    return {"up_s": farm.up_s, "workers": len(at_up), "model_loads_at_up": count(at_up, "model_loads"),
            "dispatch_overhead_s": statistics.median(overheads), "dispatch_overheads_s": overheads,
            "manifests": runs, "stream_wall_s": sum(r["wall_s"] for r in runs),
            "model_loads": count(marks[-1], "model_loads") - count(at_up, "model_loads"),
            "compositions_first": runs[0]["compositions"],
            "cross_manifest_recompositions": count(marks[-1], "compositions") - count(marks[1], "compositions"),
            "held_recomposed": sum(r["held_recomposed"] for r in runs[1:])}


# ---- one row set -----------------------------------------------------------------------------
def targets(warm: dict, render_one_s: float | None, batch: int) -> dict:
    """The issue's targets against a warm stream (manifests 2..K; the first finds nothing held).

    First image: each at most ``FIRST_IMAGE_SLACK`` x (one render of its first batch + the
    measured dispatch), one render being ``render_one_s`` per image (the sleep backend's R) or,
    when None, the manifest's first row's own ``render_s`` (a real model's measured render).
    ``first_image_met``: every manifest within its bound; ``first_image_median_met``: the median
    manifest (the controller's loop adds up to a step's wait, ``STEP_S``, now and then).
    Held compositions: none composed again."""
    bounds, firsts = [], []
    for m in warm["manifests"][1:]:
        per_image = render_one_s if render_one_s is not None else m["first_row"]["render_s"]
        bounds.append(FIRST_IMAGE_SLACK * (per_image * batch + warm["dispatch_overhead_s"]))
        firsts.append(m["first_image_s"])
    ratios = [f / b for f, b in zip(firsts, bounds)]
    return {"first_batch": batch, "render_per_image_s": render_one_s, "first_image_bounds_s": bounds,
            "first_images_s": firsts, "first_image_ratios": ratios,
            "first_image_met": bool(ratios) and max(ratios) <= 1.0,  # every manifest 2..K
            "first_image_median_met": bool(ratios) and statistics.median(ratios) <= 1.0,
            "held_recomposed": warm["held_recomposed"], "held_recomposed_met": warm["held_recomposed"] == 0}


def row_set(label: str, model: dict, pool: Any, manifests_of: Callable[[str], list], *, workers: int, tmp: str,
            roots: Sequence[str], factory: Callable | None, render_s: float | None, batch: int) -> dict:
    """(a) and (b) over the same manifests (each written to its own outputs), one after the other."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in label)
    base = os.path.join(tmp, slug)
    cold = one_shot_stream(manifests_of(os.path.join(base, "one-shot")), workers, roots=roots,
                           cache_dir=os.path.join(base, "cache-one-shot"), factory=factory)
    warm = warm_stream(manifests_of(os.path.join(base, "warm")), pool, state_dir=os.path.join(base, "state"),
                       roots=roots, probe_dir=os.path.join(base, "probes"), factory=factory)
    wait_gpus_free()
    return {"load": label, "model": model, "manifests": len(warm["manifests"]), "one_shot": cold, "warm": warm,
            "stream_ratio": cold["stream_wall_s"] / warm["stream_wall_s"], "targets": targets(warm, render_s, batch)}


def sleep_pool(name: str, model: dict, workers: int, cache_dir: str) -> Any:
    from farm.service.config import PoolConfig

    return PoolConfig(name=name, model=dict(model), workers=workers, gpus_per_worker=1.0, node_cache_dir=cache_dir)


def run(manifests: int = 5, jobs_per: int = 6, compositions: int = 3, workers: int = 2, render_s: float = 0.2,
        compose_s: float = 0.5, load_s: Sequence[float] = (0.0, 30.0), slow_manifests: int = 3,
        tiny_manifests: int = 2) -> dict:
    """Every row set (one per L, and the tiny model's when ``tiny_manifests`` > 0): a JSON-able dict."""
    if manifests < 2 or jobs_per < 1 or compositions < 1 or workers < 1:
        raise ValueError("need --manifests >= 2, --jobs-per >= 1, --compositions >= 1, --workers >= 1")
    import ray

    from benchmarks.farm_overhead import write_loras
    from farm.service.pools import CAPACITY
    from jobs.options import FarmOptions
    from testsupport.sleep import make_sleep_backend

    load_before = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench-service-")
    started, ray_start_s = start_ray(workers)
    batch = first_batch(FarmOptions().max_batch, CAPACITY)
    sets = []
    try:
        lora_dir = os.path.join(tmp, "loras")
        files = write_loras(lora_dir, compositions + 1, seed=7)
        comps = compositions_of(files, compositions)
        for i, load in enumerate(load_s):
            model = {"backend": "sleep", "render_s": render_s, "compose_s": compose_s, "load_s": float(load)}
            k = slow_manifests if load >= SLOW_LOAD_S else manifests
            pool = sleep_pool(f"sleep{i}", model, workers, os.path.join(tmp, f"cache-warm-{i}"))
            sets.append(row_set(f"{load:g}", model, pool,
                                lambda out, model=model, k=k: make_manifests(k, jobs_per, comps, model, out),
                                workers=workers, tmp=tmp, roots=[lora_dir], factory=make_sleep_backend,
                                render_s=render_s, batch=batch))
        if tiny_manifests > 0:
            sets.append(tiny_set(tiny_manifests, jobs_per, compositions, workers, tmp, batch))
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"params": {"manifests": manifests, "jobs_per": jobs_per, "compositions": compositions, "workers": workers,
                       "render_s": render_s, "compose_s": compose_s, "load_s": list(load_s),
                       "slow_manifests": slow_manifests, "tiny_manifests": tiny_manifests},
            "ray_start_s": ray_start_s, "first_batch": batch, "sets": sets,
            "load_average": [load_before, os.getloadavg()[0]]}


def tiny_set(k: int, jobs_per: int, compositions: int, workers: int, tmp: str, batch: int) -> dict:
    """The real tiny backend: model load, LoRA merge and render are real work here."""
    from farm.demo import copy_demo_loras
    from farm.service.config import parse_farm_config

    lora_dir = os.path.join(tmp, "loras-tiny")
    files = sorted(copy_demo_loras(lora_dir).values())
    comps = compositions_of(files, compositions)
    config = parse_farm_config({"pools": [{"name": "tiny", "model": {"backend": "tiny"}, "workers": workers,
                                           "node_cache_dir": os.path.join(tmp, "cache-warm-tiny")}],
                                "state": os.path.join(tmp, "state-tiny")})
    pool = config.pools[0]
    return row_set(TINY, pool.model, pool, lambda out: make_manifests(k, jobs_per, comps, pool.model, out),
                   workers=workers, tmp=tmp, roots=[lora_dir], factory=None, render_s=None, batch=batch)


# ---- the report ------------------------------------------------------------------------------
def _list(xs: Sequence[float], digits: int = 2) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in xs)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def markdown(result: dict, command: str) -> str:
    """The "## Farm service" section: the command, the machine, one table row per load and mode."""
    p = result["params"]
    lines = [
        f"## {TITLE}", "",
        f"Command: `{command}`  ",
        f"Machine: {machine(('ray', 'torch'))}; 1-minute load average {result['load_average'][0]:.1f} at the "
        f"start, {result['load_average'][1]:.1f} at the end (other work on the machine shows up in the figures)  ",
        f"Workload: a stream of manifests of {p['jobs_per']} jobs over the same {p['compositions']} compositions "
        f"(real LoRA files; prompts, seeds and outputs differ per manifest), {p['workers']} workers, each manifest "
        "submitted when the one before finished. Sleep backend: R = "
        f"{p['render_s']} s per image, C = {p['compose_s']} s per switch, L = load s; K = {p['manifests']} manifests "
        f"(K = {p['slow_manifests']} where L >= {SLOW_LOAD_S:g} s, K = {p['tiny_manifests']} for the tiny model). "
        "**one-shot**: fresh worker actors per manifest, as `farm run` does (start, load, dispatch, kill; the "
        f"Ray cluster stays up: a `farm run` without `--address` also pays its start, {result['ray_start_s']:.1f} s "
        "here). **warm**: one `FarmController` up before the stream (up time on its own), each manifest "
        "submitted and followed to `done` as `farm submit --wait` does.  ",
        "First / last image: seconds from the manifest's submit to its first / last row's `finished_at` (stamped "
        "when the dispatcher records the row, after the worker wrote the PNG), per manifest in order. Stream: the "
        "sum of the manifests' walls (one-shot: start to actors killed; warm: submit to `done` seen). "
        "Compositions: the workers' own `state()` counters (manifest 1; then manifests 2..K, for the warm farm "
        "the counters after manifest K minus after manifest 1). Held recomposed: compose events in manifests "
        "2..K (rows with `compose_s` > 0) of a composition some worker held at that manifest's submit.",
        "",
        "| load | mode | up s | first image s (per manifest) | last image s (per manifest) | stream s | "
        "model loads | compositions m1 / m2..K | held recomposed |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for s in result["sets"]:
        for mode, r in (("one-shot", s["one_shot"]), ("warm", s["warm"])):
            ms = r["manifests"]
            up = f"{r['up_s']:.2f}" if mode == "warm" else "-"
            held = str(r["held_recomposed"]) if mode == "warm" else "-"
            lines.append(f"| {s['load']} | {mode} | {up} | {_list([m['first_image_s'] for m in ms])} | "
                         f"{_list([m['last_image_s'] for m in ms])} | {r['stream_wall_s']:.2f} | {r['model_loads']} | "
                         f"{r['compositions_first']} / {r['cross_manifest_recompositions']} | {held} |")
    lines += ["", "Targets (warm farm, manifests 2..K): time to first image <= "
              f"{FIRST_IMAGE_SLACK} x (one render of the first batch + dispatch); held compositions recomposed = 0. "
              f"First batch = min(max_batch, capacity // 2) = {result['first_batch']} image(s) (`Dispatcher._send`); "
              "one render = R per image for the sleep backend, the manifest's first row's own `render_s` for the "
              f"tiny model; dispatch = median over {PROBES} one-job base-model runs on the warm farm (before the "
              "stream) of first row `finished_at` - submit - that row's fetch, compose and render seconds. "
              "Done lag: warm wall minus last image, i.e. how late `farm submit --wait` sees `done`.", "",
              "| load | one-shot / warm stream | dispatch s | first image s (m2..K) | bound s (m2..K) | "
              "met: median / every | held recomposed | met | done lag s (m2..K) |",
              "|---|---:|---:|---|---|---|---:|---|---|"]
    for s in result["sets"]:
        t, w = s["targets"], s["warm"]
        lines.append(f"| {s['load']} | {s['stream_ratio']:.1f}x | {w['dispatch_overhead_s']:.3f} | "
                     f"{_list(t['first_images_s'], 3)} | {_list(t['first_image_bounds_s'], 3)} | "
                     f"{_yes(t['first_image_median_met'])} / {_yes(t['first_image_met'])} | {t['held_recomposed']} | "
                     f"{_yes(t['held_recomposed_met'])} | "
                     f"{_list([m['done_lag_s'] for m in w['manifests'][1:]])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifests", type=int, default=5, help="K: manifests in the stream")
    ap.add_argument("--jobs-per", type=int, default=6, help="jobs per manifest")
    ap.add_argument("--compositions", type=int, default=3, help="compositions the manifests share")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--render-s", type=float, default=0.2, help="R: sleep backend seconds per image")
    ap.add_argument("--compose-s", type=float, default=0.5, help="C: sleep backend seconds per switch")
    ap.add_argument("--load-s", type=float, nargs="+", default=[0.0, 30.0], help="L: model load seconds, one row set each")
    ap.add_argument("--slow-manifests", type=int, default=3, help=f"K where L >= {SLOW_LOAD_S:g} s")
    ap.add_argument("--tiny-manifests", type=int, default=2, help="K for the real tiny model's row set (0: none)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--write-results", action="store_true", help=f"replace '## {TITLE}' in benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    result = run(a.manifests, a.jobs_per, a.compositions, a.workers, a.render_s, a.compose_s, a.load_s,
                 a.slow_manifests, a.tiny_manifests)
    command = "python -m benchmarks.service " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command.strip()
    text = markdown(result, result["command"])
    print(json.dumps(result, indent=1) if a.json else text)
    if a.write_results:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
