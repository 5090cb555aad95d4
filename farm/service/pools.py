"""A worker pool of the farm: named, detached worker actors for one model, and their dispatcher.

Workers are named ``lora-farm-<pool>-<i>`` in the farm's namespace and detached, so they
outlive the controller: a controller Ray restarts finds the same warm workers by name
(``get_if_exists``) instead of loading the model again. Ray restarts a worker whose process
dies (``max_restarts=-1``); it comes back empty and loads its model on its first call, while
the dispatcher sends its lost jobs elsewhere.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from farm.dispatcher import Dispatcher
from farm.scheduler.affinity import AffinityScheduler
from jobs.options import FarmOptions

from .secrets import NAMESPACE

log = logging.getLogger("farm.service.pools")

#: Render calls in flight per worker (the dispatcher's ``capacity``).
CAPACITY = 2


def worker_name(pool: str, i: int) -> str:
    return f"lora-farm-{pool}-{i}"


@dataclass
class Pool:
    """One pool: its config, its workers by name and the dispatcher that feeds them."""

    config: Any  # farm.service.config.PoolConfig
    lora_roots: tuple[str, ...] = ()
    #: builds the workers' backend instead of the registry's (a benchmark's measurement backend,
    #: given by the code that starts the controller; a manifest never names one)
    backend_factory: Any = None
    handles: dict[str, Any] = field(default_factory=dict)
    warming: dict[str, Any] = field(default_factory=dict)  # worker name -> its warm() call
    failed: dict[str, str] = field(default_factory=dict)  # worker name -> why it could not load its model
    dispatcher: Dispatcher = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.dispatcher is None:
            # built with fair share (its queue tracks flows); ``share`` sets the config's switch and weights
            self.dispatcher = Dispatcher({}, AffinityScheduler(), "", capacity=CAPACITY,
                                         max_batch=self.options.max_batch, retries=self.options.retries)

    def share(self, fair: bool, weights: Any) -> None:
        """The config's fair-share switch and weights (``FarmConfig.fair_share`` / ``submitters``),
        at start and on each reconcile (the usage so far is kept)."""
        self.dispatcher.policy.set_fair(fair)
        self.dispatcher.policy.set_weights(weights)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def options(self) -> FarmOptions:
        return self.config.farm_options()

    def option_clash(self, manifest: FarmOptions) -> list[str]:
        """The worker-level options a manifest set (away from the default) to other values than this pool's."""
        default, mine = FarmOptions(), self.options
        fields = (*FarmOptions.MODEL_FIELDS, "max_lora_mb")
        return [f for f in fields if getattr(manifest, f) != getattr(default, f) and getattr(manifest, f) != getattr(mine, f)]

    def scale(self, count: int) -> None:
        """Get or start workers 0..count-1; retire (kill) the ones past ``count``."""
        for i in range(count):
            name = worker_name(self.name, i)
            if name not in self.handles:
                h = self._actor(name)
                self.handles[name] = h
                self.warming[name] = h.warm.remote()
        for name in [n for n in self.handles if int(n.rsplit("-", 1)[1]) >= count]:
            self.retire(name)

    def retire(self, name: str) -> None:
        import ray

        self.dispatcher.remove_worker(name)
        h = self.handles.pop(name)
        self.warming.pop(name, None)
        self.failed.pop(name, None)
        try:
            ray.kill(h, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _actor(self, name: str) -> Any:
        from storage.policy import operator_policy
        from workers.actor import remote_worker

        c = self.config
        cls = remote_worker(num_gpus=c.gpus_per_worker, max_restarts=-1)
        kwargs: dict[str, Any] = dict(model=c.model, worker_id=name, options=self.options,
                                      adapter_cache_bytes=int(c.adapter_cache_mb) << 20,
                                      uri_policy=operator_policy("", self.lora_roots))  # "": no manifest dir
        if c.node_cache_dir:
            kwargs["cache_dir"] = c.node_cache_dir
        if c.node_cache_mb:
            kwargs["cache_budget_bytes"] = int(c.node_cache_mb) << 20
        if self.backend_factory is not None:
            kwargs["backend_factory"] = self.backend_factory
        return cls.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(**kwargs)

    def poll_warm(self) -> list[str]:
        """Workers whose model finished loading since the last poll join the dispatcher; their names."""
        import ray

        joined = []
        for name, ref in list(self.warming.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            del self.warming[name]
            try:
                st = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a worker that cannot load its model: reported by ready()
                self.failed[name] = f"{type(e).__name__}: {e}"[:2000]
                log.error("worker %s failed to load its model: %s", name, e)
                continue
            self.dispatcher.add_worker(name, self.handles[name], node_id=st.get("node", ""))
            joined.append(name)
        return joined

    def given_up(self) -> list[str]:
        """Workers of this pool the dispatcher stopped sending to (not retired ones)."""
        return [n for n, b in self.dispatcher.worker_books().items() if not b.alive and not b.retired and n in self.handles]

    def answering(self, names: list[str], timeout_s: float = 1.0) -> list[str]:
        """Those of ``names`` whose actor answers a state call within ``timeout_s`` (Ray restarted it)."""
        import ray

        out = []
        for name in names:
            try:
                ray.get(self.handles[name].state.remote(), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - still down (or gone)
                continue
            out.append(name)
        return out

    def reports(self, handles: dict, books: dict) -> list[dict]:
        """`farm workers` entries of this pool: each worker's ``state()`` and the dispatcher's view of it
        (``handles`` / ``books``: snapshots taken under the controller's lock; the calls run without it)."""
        import ray

        refs = {name: h.state.remote() for name, h in handles.items()}
        out = []
        for name, ref in refs.items():
            book = books.get(name)
            try:
                st, alive = ray.get(ref, timeout=10), True
            except Exception as e:  # noqa: BLE001 - a dead or restarting worker is listed, not hidden
                st, alive = {"error": f"{type(e).__name__}"}, False
            adapters = st.get("adapters", [])
            out.append({
                **{k: v for k, v in st.items() if k != "adapters"},
                "worker_id": name, "pool": self.name, "node": st.get("node"), "alive": alive and bool(book and book.alive),
                "ready": book is not None, "composition": st.get("composition"),
                "adapters": [a["sha256"] for a in adapters], "adapters_bytes": sum(a["bytes"] for a in adapters),
                "jobs_done": st.get("jobs_done", 0), "model_loads": st.get("model_loads", 0),
                "compositions": st.get("compositions", st.get("switches", 0)),
                "inflight": book.inflight if book else 0,
            })
        return out

    @property
    def ready(self) -> bool:
        return not self.warming and all(self.dispatcher.worker_book(n) is not None for n in self.handles)
