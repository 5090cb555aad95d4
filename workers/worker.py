"""RenderWorker: a plain class (no Ray) that renders jobs and reports what it holds.

It owns one backend (built lazily, so under Ray it is created after CUDA_VISIBLE_DEVICES
is set), one ComposedModel, a node-local LoRA file store and a byte-budget LRU of loaded
adapters. ``render(jobs)`` groups jobs by composition and size, fetches, composes only on
change, renders in batches of up to ``max_batch``, writes PNGs atomically and returns one
``ResultRow`` per job: a bad LoRA fails its own jobs, never the worker. What it renders
with (``lora_mode``, ``max_batch``, fp8, ...) is the manifest's ``jobs.options.FarmOptions``.
"""
from __future__ import annotations

import io
import os
import socket
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from jobs.manifest import Job
from jobs.options import FarmOptions
from jobs.results import ResultRow, image_uri, write_image_atomic
from jobs.stamp import stamp_png
from lora_core import Adapter
from lora_core.adapter import load_adapter_file
from lora_core.adapter_cache import AdapterCache
from lora_core.errors import LoraError
from storage.policy import UriPolicy, operator_policy
from storage.store import default_cache_dir

from .automode import Ewma
from .wrapper import ComposedModel

DEFAULT_ADAPTER_CACHE = 2 << 30
#: Concurrent background prefetches: a few stalled downloads still leave room for the rest.
PREFETCH_THREADS = 4


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
        self._store_lock = threading.Lock()
        # one composition at a time on the model: calls may run concurrently (a threaded
        # actor), fetching outside this lock, so a stalled download holds only its own jobs
        self._model_lock = threading.Lock()
        self._paths: dict[str, str] = {}  # sha256 -> local path
        self.adapters: AdapterCache[Adapter] = AdapterCache(adapter_cache_bytes, self._load_by_sha)
        self._model: ComposedModel | None = None
        self.render_s_per_image = Ewma()  # seconds per image, recent renders weigh more
        self.jobs_done = 0
        self.jobs_failed = 0

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
        return self._model

    def _load_by_sha(self, sha: str) -> Adapter:
        return load_adapter_file(self._paths[sha], allow_pickle=self.allow_pickle)

    # ---- work -----------------------------------------------------------------------------
    def fetch_adapters(self, loras: Sequence[Any]) -> tuple[list[tuple[Adapter, float]], float]:
        """LoRA refs -> (adapter, strength) pairs; the seconds spent fetching from storage."""
        t0 = time.perf_counter()
        pairs = []
        for ref in loras:
            self.uri_policy.check(ref.uri)  # here too: jobs need not have come through validation
            with self.store.lease(ref.uri, sha256=ref.sha256) as res:  # not evicted while we read it
                self._paths[res.sha256] = res.path
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

    def render(self, jobs: Sequence[Job], output_root: str, storage_options: dict | None = None) -> list[ResultRow]:
        """One result row per job, in groups of one composition and size (a failure fails its group only)."""
        opts = storage_options if storage_options is not None else self.storage_options
        rows: list[ResultRow] = []
        for group in self._groups(jobs):
            rows.extend(self._render_group(group, output_root, opts))
        return rows

    def _groups(self, jobs: Sequence[Job]) -> list[list[Job]]:
        buckets: OrderedDict[tuple, list[Job]] = OrderedDict()
        for j in jobs:
            buckets.setdefault((j.routing_key, j.steps, j.width, j.height, j.guidance, j.negative_prompt), []).append(j)
        out = []
        for group in buckets.values():
            out.extend(group[i : i + self.max_batch] for i in range(0, len(group), self.max_batch))
        return out

    def _render_group(self, group: list[Job], output_root: str, opts: dict) -> list[ResultRow]:
        fetch_s = compose_s = 0.0
        try:
            pairs, fetch_s = self.fetch_adapters(group[0].loras)  # no lock held: others render meanwhile
            with self._model_lock:
                self.model.want(pairs)
                compose_s = self.model.ensure()
                key = self.model.key
                t0 = time.perf_counter()
                images = self.model.backend.render([_request(j) for j in group])
                elapsed = time.perf_counter() - t0
                self.model.rendered(len(group), elapsed)
                render_s = elapsed / len(group)
                self.render_s_per_image.add(render_s)
                rows = [self._write(j, img, output_root, opts, key, fetch_s, compose_s, render_s)
                        for j, img in zip(group, images)]
        except Exception as e:  # noqa: BLE001 - every failure becomes a result row
            rows = [_failed(j, self.worker_id, e, fetch_s, compose_s) for j in group]
        with self._model_lock:
            for r in rows:
                if r.status == "ok":
                    self.jobs_done += 1
                else:
                    self.jobs_failed += 1
        return rows

    def _write(self, job, image, output_root, opts, key, fetch_s, compose_s, render_s) -> ResultRow:
        uri = image_uri(output_root, job.job_id)
        # stamped with the job's identity: a rerun trusts it if this row is lost (jobs.stamp)
        png = stamp_png(png_bytes(image), job, self.model_spec, composition_key=key, lora_mode=self.model.held_label)
        write_image_atomic(uri, png, opts)
        return self._ok_row(job, uri, key, fetch_s, compose_s, render_s)

    def _ok_row(self, job: Job, uri: str, key: str, fetch_s: float, compose_s: float, render_s: float) -> ResultRow:
        return ResultRow.ok(job, output_uri=uri, composition_key=key, worker_id=self.worker_id, fetch_s=fetch_s,
                            compose_s=compose_s, render_s=render_s, lora_mode=self.model.held_label)

    def state(self) -> dict:
        m = self._model
        free = None
        if torch.cuda.is_available():
            free = torch.cuda.mem_get_info()[0]
        return {
            "worker_id": self.worker_id,
            "node": socket.gethostname(),
            "model_built": m is not None,
            "composition": m.key if m else None,
            "adapters": [{"sha256": k, "bytes": b} for k, b in self.adapters.entries()],
            "adapter_cache": self.adapters.stats.as_dict(),
            "store": self.store.stats() if self._store is not None else {},
            "device": str(m.backend.device) if m else (self.device or "unbuilt"),
            "free_memory": free,
            "compose_s": m.stats.mean_s if m else 0.0,
            "switches": m.stats.switches if m else 0,
            "lora_mode": (m.auto.as_dict() if m.auto is not None else {"mode": m.lora_mode}) if m else {"mode": self.options.lora_mode},
            "render_s": self.render_s_per_image.value or 0.0,
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
        }


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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

