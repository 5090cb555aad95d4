"""`farm submit` / `farm status` through the Ray Jobs API.

The manifest is resolved here (relative paths made absolute) and shipped as JSON in the
job's working_dir, so the cluster sees the same jobs this machine validated; LoRA and
output locations must be reachable from the cluster (shared storage / fsspec URLs).

Secrets never go into that package: Ray keeps the working_dir as a zip in the cluster's
object store and unpacks it on every node that runs the job, where any process can read
it. ``storage_options`` travel as a runtime-env environment variable
(``LORA_FARM_STORAGE_OPTIONS``), which the job's ``farm run`` merges back into the
manifest (``storage_options_from_env``). The local copy lives in a private temp dir that
is gone once Ray has uploaded it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from jobs.manifest import Manifest

STORAGE_OPTIONS_ENV = "LORA_FARM_STORAGE_OPTIONS"
MANIFEST_NAME = "manifest.json"
LOG_TAIL_CHARS = 4000  # of the job's log printed by --wait
POLL_S = 1.0  # the Jobs API has no push: how often --wait asks
AGENT_WAIT_S = 30.0  # how long a fresh head's job agent may take to register before we give up
NO_AGENT = "No available agent"  # Ray's HTTP 500 while the head has no job agent (yet)


class SubmitError(RuntimeError):
    """The Jobs API at an address could not be reached or refused us; the message says what to do."""


@dataclass(frozen=True)
class JobPackage:
    """Everything `farm submit` sends: built without Ray, so tests can inspect it."""

    files: dict[str, bytes]  # the working_dir's files (uploaded to the cluster as they are)
    entrypoint: str
    env_vars: dict[str, str] = field(default_factory=dict)  # runtime_env env_vars: where secrets go

    def runtime_env(self, working_dir: str) -> dict[str, Any]:
        env: dict[str, Any] = {"working_dir": working_dir}
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


#: What the job prints first, so the submitting side knows which path it took: the farm's run id,
#: or the one-shot `farm run` (no farm up on the cluster).
RUN_MARK = "lora-farm: run "
ONE_SHOT_MARK = "lora-farm: one-shot"
MARK_WAIT_S = 120.0  # how long the submitting side waits for the job to say which


def build_job(manifest: Manifest, *, out: str | None = None, workers: int | None = None,
              python: str = sys.executable, submitter: str | None = None, priority: int = 0,
              wait: bool = False) -> JobPackage:
    """The job for a validated ``Manifest``: its JSON without ``storage_options``, which go to env_vars.

    The job runs ``farm submit --in-job``: on the cluster it hands the manifest to the farm when
    one is up (``--wait``: and follows the run), else runs it one-shot like `farm run`.
    """
    data = manifest.to_dict()
    options, data["storage_options"] = data["storage_options"], {}
    if out:
        data["output"] = out
    cmd = [python, "-m", "farm.cli", "submit", MANIFEST_NAME, "--in-job", "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    if submitter:
        cmd += ["--submitter", submitter]
    if priority:
        cmd += ["--priority", str(priority)]
    if wait:
        cmd += ["--wait"]
    env = {STORAGE_OPTIONS_ENV: json.dumps(options, sort_keys=True)} if options else {}
    return JobPackage(files={MANIFEST_NAME: json.dumps(data).encode()},
                      entrypoint=" ".join(shlex.quote(c) for c in cmd), env_vars=env)


def storage_options_from_env(environ: Any = None) -> dict | None:
    """``storage_options`` from ``$LORA_FARM_STORAGE_OPTIONS`` (JSON, per protocol), or None when unset.

    A malformed value is a manifest problem; the value is not echoed, it may hold secrets.
    """
    raw = (os.environ if environ is None else environ).get(STORAGE_OPTIONS_ENV)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
        from jobs.manifest import ManifestError

        raise ManifestError([f"${STORAGE_OPTIONS_ENV}: must be a JSON mapping {{protocol: {{options}}}} "
                             "(value not shown: it may hold secrets)"])
    return value


@contextlib.contextmanager
def _plain_errors(address: str) -> Iterator[None]:
    """Ray's refusals and connection failures as one ``SubmitError`` line that says what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        where = ("the token given is not the head's" if e.message.startswith("Authentication failed")
                 else "the cluster requires a token")
        raise SubmitError(
            f"{address}: {where}: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or "
            "~/.ray/auth_token) to the token that `ray get-auth-token` prints on the head") from None
    except RuntimeError as e:
        if NO_AGENT not in str(e):
            raise
        raise SubmitError(f"{address}: the head's job agent did not come up within {AGENT_WAIT_S:.0f} s "
                          "(see dashboard_agent.log in the head's Ray logs)") from None
    except ConnectionError as e:
        raise SubmitError(f"{address}: cannot reach the Ray Jobs API ({e})") from None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _submit_job(client: Any, job: JobPackage, work: str) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            # zips and uploads working_dir (a gcs:// package) before it returns: then work can go
            return client.submit_job(entrypoint=job.entrypoint, runtime_env=job.runtime_env(work))
        except RuntimeError as e:
            # a head just started answers before its job agent has registered (HTTP 500, "try again later")
            if NO_AGENT not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)


def submit(manifest: Manifest | str | os.PathLike, address: str, *, out: str | None = None, workers: int | None = None,
           wait: bool = False, submitter: str | None = None, priority: int = 0) -> int:
    """Submit a ``Manifest`` (or a manifest path) as a Ray job. Stdout's first line is the farm's
    run id when the cluster has a farm up (the job handed the manifest over), else the Ray job id
    (the job runs it one-shot).

    Raises ``SubmitError`` when the cluster cannot be reached or refuses us.
    """
    if isinstance(manifest, (str, os.PathLike)):
        from jobs.manifest import load_manifest

        manifest = load_manifest(manifest, storage_options_from_env())
    job = build_job(manifest, out=out, workers=workers, submitter=submitter or os.environ.get("USER"),
                    priority=priority, wait=wait)
    with _plain_errors(address):
        client = _client(address)
        with tempfile.TemporaryDirectory(prefix="farm-submit-") as work:  # 0700, removed on exit
            for name, blob in job.files.items():
                fd = os.open(os.path.join(work, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
            job_id = _submit_job(client, job, work)
        print(_which_path(client, job_id), flush=True)
        if not wait:
            return 0
        from ray.job_submission import JobStatus

        while True:
            s = client.get_job_status(job_id)
            if s.is_terminal():
                print(client.get_job_logs(job_id)[-LOG_TAIL_CHARS:])
                return 0 if s == JobStatus.SUCCEEDED else 1
            time.sleep(POLL_S)


def _which_path(client: Any, job_id: str) -> str:
    """The run id the job got from the farm, or ``job_id`` when it runs one-shot (or said nothing)."""
    deadline = time.monotonic() + MARK_WAIT_S
    while time.monotonic() < deadline:
        logs = client.get_job_logs(job_id)
        for line in logs.splitlines():
            if line.startswith(RUN_MARK):
                return line[len(RUN_MARK):].strip()
            if line.startswith(ONE_SHOT_MARK):
                return job_id
        if client.get_job_status(job_id).is_terminal():
            break
        time.sleep(POLL_S)
    return job_id


def status(job_id: str, address: str) -> int:
    with _plain_errors(address):
        client = _client(address)
        s = client.get_job_status(job_id)
        print(f"{job_id}: {s}")
        print(client.get_job_logs(job_id)[-2000:])
    return 0
