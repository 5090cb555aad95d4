"""The local cluster `farm up` starts when given no ``--address``: a `ray start --head` on
loopback that outlives the command, recorded so later commands find it and `farm down`
stops exactly the processes it started.

The record is ``$LORA_FARM_HOME/local.json`` (default ``~/.lora-farm``, private to the
user): the head's GCS address, the process group of its `ray start --block` and its temp
dir. Stopping kills that process group only (never `ray stop`, which would take down every
other Ray cluster of the user on this machine). Every Ray service binds 127.0.0.1 with
authentication off, which is only right because nothing listens beyond loopback.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from farm.cluster import LOOPBACK_ENV
from storage.localfs import atomic_local_file

HOME_ENV = "LORA_FARM_HOME"
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class LocalHead:
    address: str   # 127.0.0.1:PORT, for ray.init
    pgid: int      # the process group of `ray start --head --block`
    temp_dir: str
    dashboard: str = ""

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        with contextlib.suppress(OSError), socket.create_connection(tuple(_host_port(self.address)), timeout=1):
            return True
        return False


def home() -> str:
    path = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".lora-farm")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _record_path() -> str:
    return os.path.join(home(), "local.json")


def recorded() -> LocalHead | None:
    """The head `farm up` started here, if its record exists and it still runs."""
    try:
        with open(_record_path()) as f:
            head = LocalHead(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    return head if head.alive() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def start(num_gpus: float, num_cpus: int | None = None) -> LocalHead:
    """`ray start --head --block` on loopback in its own process group; returns once its GCS answers."""
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="lf", dir="/tmp")  # short: unix socket paths are limited
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus or max(2, os.cpu_count() or 2)}",
           f"--num-gpus={num_gpus:g}", f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dir}"]
    log_path = os.path.join(home(), "head.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **LOOPBACK_ENV}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = LocalHead(f"127.0.0.1:{port}", proc.pid, temp_dir, f"http://127.0.0.1:{dash}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not head.alive():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(head)
            raise RuntimeError(f"the local Ray head did not come up (exit code {proc.poll()}); see {log_path}")
        time.sleep(0.3)
    with atomic_local_file(_record_path(), mode=0o600) as f:  # 0600 from the start: it names our head
        f.write(json.dumps(asdict(head)).encode("utf-8"))
    return head


def stop(head: LocalHead) -> None:
    """Stop the head's processes (its group only) and forget it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(head.pgid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(head.pgid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(head.pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(head.pgid, os.WNOHANG)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(_record_path())
