"""`farm submit` through the Ray Jobs API against a real `ray start --head` on loopback."""
from __future__ import annotations

import json

import pytest
import yaml

from farm.cli import main as farm_main
from farm.submit import STORAGE_OPTIONS_ENV, build_job, storage_options_from_env
from jobs.manifest import ManifestError, validate_manifest
from jobs.results import read_results
from tests.farm.conftest import start_ray_head


@pytest.fixture
def ray_head():
    with start_ray_head() as head:
        yield head.url


def test_submit_runs_manifest_on_the_cluster(ray_head, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({
        "model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64}, "output": str(out),
        "jobs": [{"prompt": f"p{i}", "seed": i} for i in range(3)]}))
    assert farm_main(["submit", str(manifest), "--address", ray_head, "--wait"]) == 0
    job_id = capsys.readouterr().out.splitlines()[0].strip()
    rows = read_results(str(out))
    assert sorted(r.status for r in rows) == ["ok"] * 3
    assert farm_main(["status", job_id, "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out


SECRET = "s3cr3t-farm-submit-7f1d"


def _secret_manifest(tmp_path):
    return validate_manifest({
        "model": {"backend": "tiny"}, "output": "s3://renders/out", "jobs": [{"prompt": "p", "seed": 1}],
        "storage_options": {"s3": {"endpoint_url": "http://127.0.0.1:9", "key": "AKIA-farm", "secret": SECRET},
                            "http": {"headers": {"Authorization": f"Bearer {SECRET}"}}}}, base_dir=str(tmp_path))


def test_job_package_carries_no_secret_and_env_vars_bring_them_back(tmp_path):
    m = _secret_manifest(tmp_path)
    job = build_job(m, python="/opt/py/bin/python")
    blobs = b"".join(job.files.values()) + job.entrypoint.encode()
    assert SECRET.encode() not in blobs and b"AKIA-farm" not in blobs, "a secret in the job package"
    assert json.loads(job.files["manifest.json"])["storage_options"] == {}
    assert set(job.env_vars) == {STORAGE_OPTIONS_ENV} and SECRET in job.env_vars[STORAGE_OPTIONS_ENV]
    assert job.runtime_env("/w") == {"working_dir": "/w", "env_vars": job.env_vars}
    # the job side: the shipped manifest plus the env var is the manifest validated here
    shipped = json.loads(job.files["manifest.json"])
    assert validate_manifest(shipped, storage_options=storage_options_from_env(job.env_vars)) == m


def test_job_without_storage_options_sets_no_env():
    m = validate_manifest({"model": {"backend": "tiny"}, "output": "/tmp/o", "jobs": [{"prompt": "p", "seed": 1}]})
    job = build_job(m, out="/tmp/elsewhere", workers=3)
    assert job.env_vars == {} and "env_vars" not in job.runtime_env("/w")
    assert json.loads(job.files["manifest.json"])["output"] == "/tmp/elsewhere"
    assert job.entrypoint.endswith("submit manifest.json --in-job --no-progress --workers 3")


@pytest.mark.parametrize("raw", ["{not json", '["s3"]', '{"s3": "key=' + SECRET + '"}'])
def test_malformed_storage_options_env_is_a_manifest_problem_that_hides_the_value(raw):
    with pytest.raises(ManifestError) as e:
        storage_options_from_env({STORAGE_OPTIONS_ENV: raw})
    assert STORAGE_OPTIONS_ENV in str(e.value) and SECRET not in str(e.value)


def test_farm_validate_reads_storage_options_from_env(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"model": {"backend": "tiny"}, "jobs": [{"prompt": "p", "seed": 1}]}))
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, "[]")
    assert farm_main(["validate", str(manifest)]) == 2
    assert STORAGE_OPTIONS_ENV in capsys.readouterr().err
