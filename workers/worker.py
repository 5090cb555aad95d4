"""RenderWorker: a plain class (no Ray) that renders jobs and reports what it holds.

It owns one backend (built lazily, so under Ray it is created after CUDA_VISIBLE_DEVICES
is set), one ComposedModel, a node-local LoRA file store and a byte-budget LRU of loaded
adapters. ``render(jobs)`` groups jobs by composition and size, fetches, composes only on
change, renders in batches of up to ``max_batch``, writes PNGs atomically and returns one
``ResultRow`` per job (a bad LoRA fails its own jobs, never the worker), with what it holds
after them (``workers.holds``: its branch cache and adapters in memory). What it renders
with (``lora_mode``, ``max_batch``, fp8, ...) is the manifest's ``jobs.options.FarmOptions``.

Only compose + render hold the model lock. Encoding, stamping and writing a group's PNGs
(a quarter second per 1328 px image) run on a small writer pool afterwards
(``overlap_output``), so the device renders the next group, or the other concurrent call's,
meanwhile; what a row reports about the model is captured under the lock at render time.
"""
from __future__ import annotations

import io
import os
import socket
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from jobs.manifest import Job
from jobs.options import FarmOptions
from jobs.results import ResultRow, image_uri
from jobs.stamp import stamp_png
from lora_core import Adapter
from lora_core.adapter import load_adapter_file
from lora_core.adapter_cache import AdapterCache
from lora_core.errors import LoraError
from storage.output import write_bytes_atomic
from storage.policy import UriPolicy, operator_policy
from storage.store import default_cache_dir

from .automode import Ewma
from .holds import Holds, Rows
from .wrapper import ComposedModel

DEFAULT_ADAPTER_CACHE = 2 << 30
#: Concurrent background prefetches: a few stalled downloads still leave room for the rest.
PREFETCH_THREADS = 4
#: Threads that encode, stamp and write PNGs off the model lock: one per concurrent call
#: (workers.actor.CONCURRENT_CALLS), so both calls' writes keep pace with one device.
WRITER_THREADS = 2
#: Earlier groups of one call that may still be writing while its next group renders. One is
#: double buffering: the device never waits for the encoder unless encoding is the slower
#: side, and a call holds at most two groups of decoded images.
WRITE_AHEAD_GROUPS = 1


@dataclass(frozen=True)
class Rendered:
    """What a group's rows report about the model, captured under the model lock when it
    rendered: by the time its images are written, another call may have switched the model."""

    key: str
    lora_mode: str
    fetch_s: float
    compose_s: float
    render_s: float


class RenderWorker:
    def __init__(
        self,
        model: dict | None = None,
        worker_id: str | None = None,
        *,
        options: FarmOptions | None = None,
        cache_dir: str | None = None,
        cache_budget_bytes: int | None = None,
        adapter_cache_bytes: int = DEFAULT_ADAPTER_CACHE,
        storage_options: dict | None = None,
        device: str | None = None,
        num_threads: int | None = None,
        allow_pickle: bool = False,
        uri_policy: UriPolicy | None = None,  # what LoRA URIs may reach (storage.policy); default: the operator's env
        backend_factory: Callable[..., Any] | None = None,  # instead of the registry's (see workers.backends.registry)
        overlap_output: bool = True,  # encode/write PNGs off the model lock; False: inside it (the old, serial order)
        image_writer: Callable[[str, bytes, dict], Any] | None = None,  # (uri, png, opts) -> None; write_bytes_atomic
    ):
        self.model_spec = dict(model or {"backend": "tiny"})
        self.backend_factory = backend_factory
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.options = options or FarmOptions()  # lora_mode, max_batch and the model options (fp8, ...)
        self.max_batch = max(1, int(self.options.max_batch))
        self.storage_options = storage_options or {}
        self.device = device
        self.num_threads = num_threads
        self.allow_pickle = allow_pickle
        self.uri_policy = uri_policy or operator_policy()
        self.cache_dir = cache_dir or default_cache_dir()
        self._cache_budget = cache_budget_bytes
        self._store = None
        self._prefetcher: ThreadPoolExecutor | None = None
        self.overlap_output = bool(overlap_output)
        self.image_writer = image_writer or write_bytes_atomic
        self._writer: ThreadPoolExecutor | None = None
        self._writer_lock = threading.Lock()
        self._store_lock = threading.Lock()
        # one composition at a time on the model: calls may run concurrently (a threaded
        # actor), fetching outside this lock, so a stalled download holds only its own jobs
        self._model_lock = threading.Lock()
        self._paths: dict[str, tuple[str, str]] = {}  # sha256 -> (local path, the URI it was fetched for)
        self.adapters: AdapterCache[Adapter] = AdapterCache(adapter_cache_bytes, self._load_by_sha)
        self._model: ComposedModel | None = None
        self.render_s_per_image = Ewma()  # seconds per image, recent renders weigh more
        self.model_loads = 0  # backends built (0 until the first render, then 1)
        self._count_lock = threading.Lock()  # not the model lock: writer threads count too
        self.jobs_done = 0
        self.jobs_failed = 0
        # what it holds, as each render call reports it: taken under the model lock after each
        # group that reached the model, rendered or failed (``seq`` counts them): the latest is the freshest
        self._origin = uuid.uuid4().hex  # this process: a restarted actor is another one, empty
        self._holds_seq = 0
        self._holds: Holds | None = None

    # ---- lazy parts -----------------------------------------------------------------------
    @property
    def store(self):
        with self._store_lock:  # prefetch threads and the render thread: one store, one in-flight map
            if self._store is None:
                from storage.store import LoraStore

                kw = {"storage_options": self.uri_policy.guard(self.storage_options),
                      "max_bytes": int(self.options.max_lora_mb * 2**20)}
                if self._cache_budget:
                    kw["budget_bytes"] = self._cache_budget
                self._store = LoraStore(self.cache_dir, **kw)
            return self._store

    @property
    def model(self) -> ComposedModel:
        if self._model is None:
            from .backends import make_backend

            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            backend = make_backend(self.model_spec, device=device, factory=self.backend_factory)
            self._model = ComposedModel(backend, **self.options.model_options())
            self.model_loads += 1
        return self._model

    def _load_by_sha(self, sha: str) -> Adapter:
        path, uri = self._paths[sha]
        # a remote file is read from its cache blob (.../blobs/<sha256>): the adapter and its errors name the URI
        return load_adapter_file(path, allow_pickle=self.allow_pickle, name=uri)

    # ---- work -----------------------------------------------------------------------------
    def fetch_adapters(self, loras: Sequence[Any]) -> tuple[list[tuple[Adapter, float]], float]:
        """LoRA refs -> (adapter, strength) pairs; the seconds spent fetching from storage."""
        t0 = time.perf_counter()
        pairs = []
        for ref in loras:
            self.uri_policy.check(ref.uri)  # here too: jobs need not have come through validation
            with self.store.lease(ref.uri, sha256=ref.sha256) as res:  # not evicted while we read it
                self._paths[res.sha256] = (res.path, ref.uri)
                pairs.append((self.adapters.get(res.sha256), float(ref.strength)))
        return pairs, time.perf_counter() - t0

    def prefetch(self, loras: Sequence[Any]) -> int:
        """Start fetching (and loading) adapters ahead of need; returns how many were queued.

        In background threads, one task per LoRA: under Ray an actor runs one method at a
        time, so a prefetch that waited for a stalled download held every render of this
        worker behind it. A render that needs a LoRA being prefetched joins its download
        (the store's single flight); errors wait for the render that needs the file.
        """
        refs = list(loras)
        for ref in refs:
            self._prefetch_pool().submit(self._prefetch_one, ref)
        return len(refs)

    def _prefetch_one(self, ref: Any) -> None:
        try:
            self.fetch_adapters([ref])
        except Exception:  # noqa: BLE001 - best effort: the render that needs it reports the error
            pass

    def _prefetch_pool(self) -> ThreadPoolExecutor:
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=PREFETCH_THREADS, thread_name_prefix="prefetch")
        return self._prefetcher

    def _writer_pool(self) -> ThreadPoolExecutor:
        with self._writer_lock:  # two concurrent calls may both be first
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="png-writer")
            return self._writer

    def render(self, jobs: Sequence[Job], output_root: str, storage_options: dict | None = None) -> Rows:
        """One result row per job, group after group (a group is one composition and size, at
        most ``max_batch`` jobs; a failure fails its group only, a failed write its job only).
        The rows come as ``Rows``: a list, and ``holds``, the worker's latest report of what it
        holds (``workers.holds.Rows`` says which).

        With ``overlap_output`` a group's PNGs are written by the writer pool while the next
        group composes and renders; this returns once every image of this call is written.
        """
        opts = storage_options if storage_options is not None else self.storage_options
        slots: list[ResultRow | Future] = []
        writing: deque[list[Future]] = deque()  # this call's groups whose writes were handed off
        for group in self._groups(jobs):
            while len(writing) > WRITE_AHEAD_GROUPS:  # bound what a call holds (outside the model lock)
                wait(writing.popleft())
            out = self._render_group(group, output_root, opts)
            handed = [x for x in out if isinstance(x, Future)]
            if handed:
                writing.append(handed)
            slots.extend(out)
        rows = [x.result() if isinstance(x, Future) else x for x in slots]
        return Rows(rows, self._holds)  # the latest report (``workers.holds.Rows``)

    def _take_holds(self, model: ComposedModel) -> None:
        """What it holds now, for the next reply; called holding the model lock."""
        self._holds_seq += 1
        paths = self._paths
        adapters = tuple(p[1] for sha, _ in self.adapters.entries() if (p := paths.get(sha)) is not None)
        self._holds = Holds(self._origin, self._holds_seq, model.prepared_keys(), adapters)

    def _groups(self, jobs: Sequence[Job]) -> list[list[Job]]:
        buckets: OrderedDict[tuple, list[Job]] = OrderedDict()
        for j in jobs:
            buckets.setdefault((j.routing_key, j.steps, j.width, j.height, j.guidance, j.negative_prompt), []).append(j)
        out = []
        for group in buckets.values():
            out.extend(group[i : i + self.max_batch] for i in range(0, len(group), self.max_batch))
        return out

    def _render_group(self, group: list[Job], output_root: str, opts: dict) -> list[ResultRow | Future]:
        """Fetch (no lock), compose + render (the model lock), then the rows: written here
        under the lock when not ``overlap_output``, else futures of the writer pool."""
        fetch_s = compose_s = 0.0
        try:
            pairs, fetch_s = self.fetch_adapters(group[0].loras)  # no lock held: others render meanwhile
            with self._model_lock:
                try:
                    model = self.model
                    model.want(pairs)
                    compose_s = model.ensure()
                    t0 = time.perf_counter()
                    images = model.backend.render([_request(j) for j in group])
                    elapsed = time.perf_counter() - t0
                    if len(images) != len(group):  # zip would drop the rows of the missing ones
                        name = getattr(model.backend, "name", type(model.backend).__name__)
                        raise RuntimeError(f"backend {name!r} returned {len(images)} images "
                                           f"for a batch of {len(group)}")
                    model.rendered(len(group), elapsed)
                    self.render_s_per_image.add(elapsed / len(group))
                    made = Rendered(model.key, model.held_label, fetch_s, compose_s, elapsed / len(group))
                    if not self.overlap_output:  # the serial order: the device waits for the encoder
                        return [self._write_row(j, img, output_root, opts, made) for j, img in zip(group, images)]
                finally:  # failed or not: a switch may have evicted (or packed) branches before it raised
                    if self._model is not None:
                        self._take_holds(self._model)
        except Exception as e:  # noqa: BLE001 - every failure becomes a result row
            rows = [_failed(j, self.worker_id, e, fetch_s, compose_s) for j in group]
            self._tally(rows)
            return rows
        pool = self._writer_pool()
        return [pool.submit(self._write_row, j, img, output_root, opts, made) for j, img in zip(group, images)]

    def _write_row(self, job: Job, image, output_root: str, opts: dict, made: Rendered) -> ResultRow:
        """The job's row once its PNG is written; a failed write fails this job only. Never raises."""
        try:
            row = self._write(job, image, output_root, opts, made.key, made.fetch_s, made.compose_s, made.render_s,
                              lora_mode=made.lora_mode)
        except Exception as e:  # noqa: BLE001 - every failure becomes a result row
            row = _failed(job, self.worker_id, e, made.fetch_s, made.compose_s)
        self._tally([row])
        return row

    def _tally(self, rows: Sequence[ResultRow]) -> None:
        with self._count_lock:
            for r in rows:
                if r.status == "ok":
                    self.jobs_done += 1
                else:
                    self.jobs_failed += 1

    def _write(self, job, image, output_root, opts, key, fetch_s, compose_s, render_s, *,
               lora_mode: str | None = None) -> ResultRow:
        """Encode, stamp and write one PNG; its ok row. Raises when it cannot (``_write_row`` turns
        that into the job's failed row). Runs on a writer thread: given ``lora_mode`` (as
        ``_write_row`` always gives it) it reads nothing of the model."""
        uri = image_uri(output_root, job.job_id)
        if lora_mode is None:
            lora_mode = self.model.held_label
        # stamped with the job's identity: a rerun trusts it if this row is lost (jobs.stamp)
        png = stamp_png(png_bytes(image), job, self.model_spec, composition_key=key, lora_mode=lora_mode)
        self.image_writer(uri, png, opts)
        return self._ok_row(job, uri, key, fetch_s, compose_s, render_s, lora_mode=lora_mode)

    def _ok_row(self, job: Job, uri: str, key: str, fetch_s: float, compose_s: float, render_s: float, *,
                lora_mode: str | None = None) -> ResultRow:
        """``lora_mode``: what the model held when it rendered (captured under the lock); None
        reads the model now (only right for callers that still hold the lock)."""
        return ResultRow.ok(job, output_uri=uri, composition_key=key, worker_id=self.worker_id, fetch_s=fetch_s,
                            compose_s=compose_s, render_s=render_s,
                            lora_mode=self.model.held_label if lora_mode is None else lora_mode)

    def state(self) -> dict:
        """What this worker holds and has done (DESIGN "farm workers"): every key is cheap to read."""
        m = self._model
        free = None
        if torch.cuda.is_available():
            free = torch.cuda.mem_get_info()[0]
        adapters = self.adapters.entries()
        per_image = self.render_s_per_image.value
        return {
            "worker_id": self.worker_id,
            "node": socket.gethostname(),
            "model_built": m is not None,
            "composition": m.key if m else None,
            "adapters": [{"sha256": k, "bytes": b} for k, b in adapters],
            "adapters_bytes": sum(b for _, b in adapters),
            "adapter_cache": self.adapters.stats.as_dict(),
            "store": self.store.stats() if self._store is not None else {},
            "device": str(m.backend.device) if m else (self.device or "unbuilt"),
            "free_memory": free,
            "device_memory": _device_memory(m.backend.device) if m else None,
            "compose_s": m.stats.mean_s if m else 0.0,
            "switches": m.stats.switches if m else 0,
            "compositions": m.stats.switches if m else 0,
            "prepared": list(self._holds.prepared) if self._holds else [],  # content keys, as its last report
            "model_loads": self.model_loads,
            "lora_mode": (m.auto.as_dict() if m.auto is not None else {"mode": m.lora_mode}) if m else {"mode": self.options.lora_mode},
            "render_s": per_image or 0.0,
            "images_per_s": 1.0 / per_image if per_image else 0.0,
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
        }


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _device_memory(device) -> int | None:
    """Bytes torch has allocated on ``device`` when it is a CUDA device; None otherwise."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_allocated(dev))


def _request(job):
    from .backends.base import RenderRequest

    return RenderRequest(prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, steps=job.steps,
                         width=job.width, height=job.height, guidance=job.guidance)


def _failed(job: Job, worker_id: str, e: BaseException, fetch_s: float, compose_s: float) -> ResultRow:
    transient = bool(getattr(e, "transient", False)) or _is_oom(e)
    msg = f"{type(e).__name__}: {e}"
    if not isinstance(e, LoraError) and not transient:
        msg += " | " + traceback.format_exc(limit=3).strip().splitlines()[-1]
    return ResultRow.failed(job, msg, worker_id=worker_id, transient=transient, fetch_s=fetch_s, compose_s=compose_s)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()

