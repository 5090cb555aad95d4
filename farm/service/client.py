"""The CLI side of the farm service: find the farm, call its controller, print what it says.

`farm up / submit / status / cancel / workers / down` connect to the cluster as a Ray
driver (``--address``, else the head `farm up` started here: ``farm/service/local.py``) and
call the named controller actor. Nothing here listens: whoever reaches the farm is whoever
Ray lets onto the cluster.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from . import local
from .actors import controller_handle, start_controller
from .secrets import NAMESPACE

READY_TIMEOUT_S = 600.0
POLL_S = 0.5

#: Where the commands' results go. The CLI points it at stdout and sends everything else
#: there (Ray's driver prints its error notices, e.g. "A worker died", to stdout) to stderr,
#: so `--json` output stays parseable.
stdout = sys.stdout
#: Printed before the run id `farm submit` prints (inside a Jobs API job: farm.submit.RUN_MARK).
mark = ""


def emit(text: str) -> None:
    stdout.write(text + "\n")  # one write: nothing another thread prints lands inside a line of it
    stdout.flush()


class FarmUnavailable(RuntimeError):
    """No farm is up where we looked; the message says where and what to run."""


def connect(address: str | None, *, must: bool = True) -> str | None:
    """ray.init onto ``address`` or the local farm's head; the address joined (None: no local head)."""
    from farm.cluster import LOOPBACK_ENV

    extra = {}
    if address is None:
        head = local.recorded()
        if head is None:
            if must:
                raise FarmUnavailable("no farm is up on this machine (`farm up --config FARM.yaml` starts one; "
                                      "--address reaches one on a cluster)")
            return None
        address = head.address
        # before ray is imported: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import, and
        # with it on maps a 127.0.0.1 address to this machine's outbound IP, where no GCS listens
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        extra["_node_ip_address"] = "127.0.0.1"
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False, **extra)
    return address


def farm_is_up(address: str | None) -> bool:
    """Whether the cluster at ``address`` (connected to here) has a farm controller."""
    connect(address)
    return controller_handle() is not None


def controller(address: str | None) -> Any:
    connect(address)
    h = controller_handle()
    if h is None:
        raise FarmUnavailable(f"no farm controller on the cluster at {address or 'this machine'} "
                              "(`farm up --config FARM.yaml` starts one)")
    return h


def call(handle: Any, method: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
    """One controller call; a controller Ray is restarting is waited for (its calls fail meanwhile)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from .controller import SubmitRefused

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(getattr(handle, method).remote(*args, **kwargs), timeout=timeout)
        except RayTaskError as e:
            if isinstance(e.cause, SubmitRefused):
                raise SubmitRefused(str(e.cause)) from None  # the farm's refusal, without Ray's traceback
            raise
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)  # restarting: ask again


def up(config_path: str, address: str | None) -> int:
    from .config import FarmConfigError, load_farm_config

    try:
        config = load_farm_config(config_path)
    except FarmConfigError as e:
        print(f"{config_path}: {len(e.problems)} problem(s):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    problem = _state_root_problem(config) if address is None else None  # a cluster's root may not be ours to read
    if problem:
        print(f"{config_path}: state: {problem}", file=sys.stderr)
        return 2
    if address is None and local.recorded() is None:
        from farm.cluster import gpu_count

        wanted = sum((p.workers if isinstance(p.workers, int) else 1) * p.gpus_per_worker for p in config.pools)
        head = local.start(num_gpus=gpu_count() or max(wanted, 1))
        print(f"started a local Ray head at {head.address} (loopback only)", file=sys.stderr)
    connect(address)
    h = controller_handle()
    if h is None:
        h = start_controller(config.to_dict())
        verb = "started"
    else:
        call(h, "reconcile", config.to_dict())
        verb = "running; reconciled"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        r = call(h, "ready")
        if r["ready"]:
            break
        if r.get("failed"):
            for name, why in r["failed"].items():
                print(f"farm up: worker {name} could not load its model: {why}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"farm up: workers not ready after {READY_TIMEOUT_S:.0f} s: {r['workers']}", file=sys.stderr)
            return 1
        time.sleep(POLL_S)
    emit(json.dumps({"farm": verb, "workers": r["workers"]}))
    return 0


def _state_root_problem(config: Any) -> str | None:
    """Why the state root cannot be used from here (the controller would fail the same way), or None."""
    from .state import StateStore

    try:
        StateStore(config.state, dict(config.storage_options)).list()
    except Exception as e:  # noqa: BLE001 - any storage error: said here, not in a restart loop on the cluster
        return f"{config.state!r} cannot be read: {type(e).__name__}: {e}"
    return None


def submit(manifest_path: str, address: str | None, *, submitter: str | None, priority: int, wait: bool,
           progress: bool = True, out: str | None = None) -> int:
    from farm.loading import load_or_report

    m = load_or_report(manifest_path)
    if m is None:
        return 2
    h = controller(address)
    data = m.to_dict()
    opts, data["storage_options"] = data["storage_options"], {}
    if out:
        data["output"] = out if "://" in out else os.path.abspath(out)
    from .controller import SubmitRefused

    try:
        st = call(h, "submit", data, opts, submitter or os.environ.get("USER") or "default", priority)
    except SubmitRefused as e:
        print(f"farm submit: {e}", file=sys.stderr)
        return 2
    emit(mark + st["run_id"])
    if st.get("resubmitted"):
        print(f"{st['run_id']}: already running ({st['ok']} of {st['total']} done); not queued twice", file=sys.stderr)
    if not wait:
        return 0
    return follow(h, st["run_id"], progress)


def follow(h: Any, run_id: str, progress: bool = True) -> int:
    """Poll one run until it ends, with a progress bar; exit like `farm run`."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            st = call(h, "status", run_id)
            if bar is not None:
                bar.total = st["total"]
                bar.n = st["ok"] + st["failed"]
                bar.set_postfix(ok=st["ok"], failed=st["failed"], running=st["running"], refresh=False)
                bar.refresh()
            if st["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(POLL_S)
    finally:
        if bar is not None:
            bar.close()
    emit(f"{run_id}: {st['state']}: {st['ok']} ok, {st['failed']} failed (of {st['total']}); "
          f"images: {st['output'].rstrip('/')}/images/")
    return 0 if st["state"] == "done" else 1


def status(run_id: str | None, address: str | None, as_json: bool) -> int:
    from .controller import SubmitRefused

    h = controller(address)
    try:
        st = call(h, "status", run_id)
    except SubmitRefused as e:
        print(f"farm status: {e}", file=sys.stderr)
        return 2
    if as_json:
        emit(json.dumps(st, indent=1))
    else:
        for s in ([st] if isinstance(st, dict) else st):
            eta = f", eta {s['eta_s']:.0f} s" if s.get("eta_s") else ""
            emit(f"{s['run_id']}  {s['state']:<9}  {s['ok']} ok, {s['failed']} failed, {s['running']} running, "
                  f"{s['queued']} queued of {s['total']}{eta}  -> {s['output']}")
            for c in s.get("compositions", []):
                names = " + ".join(f"{os.path.basename(x['uri'])}@{x['strength']:g}" for x in c["loras"]) or "(base)"
                emit(f"    {names}: {c['ok']} ok, {c['failed']} failed, {c['left']} left of {c['total']}")
    return 0


def cancel(run_id: str, address: str | None) -> int:
    from .controller import SubmitRefused

    try:
        st = call(controller(address), "cancel", run_id)
    except SubmitRefused as e:
        print(f"farm cancel: {e}", file=sys.stderr)
        return 2
    emit(json.dumps(st))
    return 0


def workers(address: str | None, as_json: bool) -> int:
    ws = call(controller(address), "workers")
    if as_json:
        emit(json.dumps(ws, indent=1))
    else:
        for w in ws:
            comp = (w["composition"] or "-")[:16]
            emit(f"{w['worker_id']}  pool={w['pool']}  node={str(w.get('node'))[:12]}  alive={w['alive']}  "
                  f"composition={comp}  adapters={len(w['adapters'])} ({w['adapters_bytes'] / 2**20:.1f} MiB)  "
                  f"jobs={w['jobs_done']}  loads={w['model_loads']}  compositions={w['compositions']}")
    return 0


def down(address: str | None, now: bool) -> int:
    head = local.recorded() if address is None else None
    connect(address)  # before ray is imported here (see connect)
    import ray

    h = controller_handle()
    if h is not None:
        r = call(h, "shutdown", now, timeout=900)
        with_left = f"; {len(r['unfinished_runs'])} unfinished run(s) stay recorded for the next `farm up`" \
            if r["unfinished_runs"] else ""
        ray.kill(h, no_restart=True)
        emit(f"farm stopped{with_left}")
    elif head is None:
        emit(f"no farm is up on {address or 'this machine'}")
    ray.shutdown()
    if head is not None:
        local.stop(head)
        emit(f"local Ray head at {head.address} stopped")
    return 0
