"""`farm submit` against a head on loopback with Ray's token authentication on, as the README's
"Multi-node" section sets one up: with the head's token the job runs (reading and writing S3 on
moto with credentials that travel as a runtime-env variable, never in the job package, and
leaving no temp dir behind); without it, or with another token, a plain refusal."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import yaml

from jobs.results import read_results
from tests.farm.conftest import start_ray_head
from tests.storage.servers import MotoS3

# credentials must come from the manifest's storage_options alone, not from this process
NO_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _env(home: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NO_AWS and not k.startswith("RAY_AUTH_TOKEN")}
    return {**env, "HOME": home, **extra}


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head started like the README says: a token from `ray get-auth-token --generate`, RAY_AUTH_MODE=token."""
    home = str(tmp_path_factory.mktemp("head-home"))  # the token file lands in HOME/.ray, not the user's
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    gen = subprocess.run([ray_bin, "get-auth-token", "--generate"], env=_env(home), capture_output=True, text=True,
                         timeout=60, check=True)
    token = gen.stdout.strip()
    assert len(token) >= 32 and open(os.path.join(home, ".ray", "auth_token")).read().strip() == token
    with start_ray_head(_env(home, RAY_AUTH_MODE="token"), headers={"Authorization": f"Bearer {token}"}) as head:
        yield head, token


def _submit(manifest: str, url: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # a fresh process: Ray reads RAY_AUTH_MODE once per process, and this one runs with it disabled
    return subprocess.run([sys.executable, "-m", "farm.cli", "submit", manifest, "--address", url, "--wait"],
                          env=env, capture_output=True, text=True, timeout=180)


def _files_holding(root: str, needle: bytes) -> list[str]:
    hits = []
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:  # sockets, files a Ray process removed meanwhile
                pass
    return hits


def _tiny_manifest(path, output: str, n: int, **extra) -> str:
    path.write_text(yaml.safe_dump({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                                    "output": output, "jobs": [{"prompt": f"p{i}", "seed": i} for i in range(n)],
                                    **extra}))
    return str(path)


def test_submit_with_the_token_runs_and_leaves_no_secret_behind(token_head, tmp_path):
    head, token = token_head
    secret = f"farm-secret-{uuid.uuid4().hex}"
    with MotoS3() as s3:
        s3.fs().mkdir("renders")
        opts = {"s3": {"endpoint_url": s3.endpoint, "key": f"key-{secret}", "secret": secret}}
        manifest = _tiny_manifest(tmp_path / "m.yaml", "s3://renders/run", 2, storage_options=opts)
        client_tmp = tmp_path / "client-tmp"
        client_tmp.mkdir()
        home = tmp_path / "client-home"
        home.mkdir()
        r = _submit(manifest, head.url, _env(str(home), TMPDIR=str(client_tmp), RAY_AUTH_MODE="token",
                                             RAY_AUTH_TOKEN=token))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert r.stdout.splitlines()[0].startswith("raysubmit_"), "first stdout line: the job id"
        rows = read_results("s3://renders/run", {"s3": {**opts["s3"]}})
        assert sorted((row.job_id, row.status) for row in rows) == sorted((row.job_id, "ok") for row in rows)
        assert len(rows) == 2, "the job reached S3 with the credentials it was sent"
    assert [p for p in os.listdir(client_tmp) if p.startswith("farm-submit-")] == [], "submit's temp dir left behind"
    assert _files_holding(str(client_tmp), secret.encode()) == []
    # the package Ray unpacked on the head (its working_dir) holds the manifest, not the secret
    unpacked = os.path.join(head.temp_dir, "session_latest", "runtime_resources", "working_dir_files")
    manifests = [os.path.join(d, n) for d, _, ns in os.walk(unpacked) for n in ns if n == "manifest.json"]
    assert manifests, f"no unpacked job package under {unpacked}"
    assert _files_holding(unpacked, secret.encode()) == [], "a secret in the job package"
    # nor in any log of the run; Ray itself records runtime envs in its agent's log only, on purpose
    leaked = [p for p in _files_holding(head.temp_dir, secret.encode())
              if not os.path.basename(p).startswith("runtime_env_agent")]
    assert leaked == [], f"the secret in {leaked}"


@pytest.mark.parametrize("auth, says", [
    ({"RAY_AUTH_MODE": "disabled"}, "the cluster requires a token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "the token given is not the head's"),
])
def test_submit_without_the_token_is_refused_plainly(token_head, tmp_path, auth, says):
    head, token = token_head
    from ray.job_submission import JobSubmissionClient

    jobs_before = len(JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {token}"}).list_jobs())
    out = tmp_path / "out"
    home = tmp_path / "home"
    home.mkdir()
    r = _submit(_tiny_manifest(tmp_path / "m.yaml", str(out), 1), head.url, _env(str(home), **auth))
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"farm submit: {head.url}: {says}: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert len(JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {token}"}).list_jobs()) == jobs_before
    assert not out.exists()
    st = subprocess.run([sys.executable, "-m", "farm.cli", "status", "raysubmit_x", "--address", head.url],
                        env=_env(str(home), **auth), capture_output=True, text=True, timeout=60)
    assert st.returncode == 1 and f"farm status: {head.url}: {says}" in st.stderr, st.stderr[-3000:]
