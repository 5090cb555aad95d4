"""Result rows and tables: durable appends, merge, killed runs, the skip set, any fsspec root."""
from __future__ import annotations

import json
import os
import pickle
import uuid

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs import ResultRow, ResultsWriter, completed_jobs, image_uri, read_results, validate_manifest
from jobs.results import SCHEMA, read_results_table, rows_to_table
from storage.output import write_bytes_atomic
from storage.output import write_bytes_atomic

DESIGN_COLUMNS = ["job_id", "status", "output_uri", "composition_key", "worker_id", "attempts",
                  "fetch_s", "compose_s", "render_s", "error"]


def ok(job_id: str, root: str, **kw) -> ResultRow:
    return ResultRow(job_id=job_id, status="ok", output_uri=image_uri(root, job_id), worker_id="w0", **kw)


def failed(job_id: str, **kw) -> ResultRow:
    return ResultRow(job_id=job_id, status="failed", error="ChecksumMismatch: bad", **kw)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"memory://results-{uuid.uuid4().hex[:8]}/out"


def test_schema_has_the_design_columns():
    assert SCHEMA.names[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
    for name in ("prompt", "seed", "loras", "width", "height", "steps", "finished_at"):
        assert name in SCHEMA.names


def test_append_then_finalize_keeps_the_latest_row_per_job(root):
    writer = ResultsWriter(root)
    writer.append([failed("a", attempts=1), ok("b", root)])
    writer.append([ok("a", root, attempts=2)])
    assert writer.append([]) is None
    table = writer.finalize()
    assert table.num_rows == 2
    fs, path = fsspec.core.url_to_fs(root)
    assert fs.exists(f"{path}/results.parquet")
    assert not fs.exists(f"{path}/results.parts") or not fs.ls(f"{path}/results.parts")
    rows = {r.job_id: r for r in read_results(root)}
    assert rows["a"].status == "ok" and rows["a"].attempts == 2
    with fs.open(f"{path}/results.parquet", "rb") as f:
        assert pq.read_table(f).schema.names == SCHEMA.names


def test_a_killed_run_is_readable_and_a_rerun_continues(root):
    first = ResultsWriter(root)
    first.append([ok("a", root)])
    first.append([failed("b")])
    # killed here: no finalize. Everything written so far reads back.
    assert {r.job_id: r.status for r in read_results(root)} == {"a": "ok", "b": "failed"}
    second = ResultsWriter(root)  # the re-run numbers its parts after the old ones, under its own id
    assert second.append([ok("b", root)]).endswith(f"000002-{second.writer_id}.parquet")
    assert {r.job_id: r.status for r in read_results(root)} == {"a": "ok", "b": "ok"}
    second.finalize()
    third = ResultsWriter(root)
    third.append([failed("c")])
    third.finalize()  # merges the existing results.parquet with the new part
    assert {r.job_id: r.status for r in read_results(root)} == {"a": "ok", "b": "ok", "c": "failed"}


def test_leftover_temp_files_and_bad_parts_are_skipped(tmp_path, caplog):
    root = str(tmp_path / "out")
    ResultsWriter(root).append([ok("a", root)])
    parts = tmp_path / "out" / "results.parts"
    (parts / ".000001.parquet.abc.tmp").write_bytes(b"half")
    (parts / "000007.parquet").write_bytes(b"not parquet")
    assert [r.job_id for r in read_results(root)] == ["a"]
    assert "skipping unreadable results file" in caplog.text
    ResultsWriter(root).finalize()
    assert os.path.exists(parts / "000007.parquet")  # never delete what was not merged
    assert not os.path.exists(parts / "000000.parquet")


def test_completed_jobs_requires_the_image(root):
    writer = ResultsWriter(root)
    writer.append([ok("drawn", root), ok("lost", root), failed("broken")])
    write_bytes_atomic(image_uri(root, "drawn"), b"\x89PNG fake")
    write_bytes_atomic(image_uri(root, "broken"), b"\x89PNG stale")
    assert completed_jobs(root) == {"drawn"}
    writer.append([failed("drawn")])  # the latest row wins, even over an image
    assert completed_jobs(root) == set()


def test_nothing_written_reads_as_empty(root):
    assert read_results(root) == [] and completed_jobs(root) == set()
    assert read_results_table(root).schema == SCHEMA


def test_image_uri_layout_and_escapes():
    assert image_uri("out", "cat-1") == os.path.join("out", "images", "cat-1.png")
    assert image_uri("s3://bucket/run/", "a.b_c") == "s3://bucket/run/images/a.b_c.png"
    for bad in ["../x", "a/b", "..", "a..b", "", "/abs", "x\\y", None]:
        with pytest.raises(ValueError):
            image_uri("s3://bucket/run", bad)


def test_write_is_atomic_on_local_disk(tmp_path):
    target = tmp_path / "images" / "a.png"
    write_bytes_atomic(str(target), b"one")
    write_bytes_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["a.png"]  # no temp files left behind


def test_rows_from_jobs_and_worker_dicts():
    m = validate_manifest({"jobs": [{"id": "j", "prompt": "cat", "seed": 5, "width": 64,
                                     "loras": [{"uri": "s3://b/a", "strength": 0.5}]}]})
    job = m.jobs[0]
    row = ResultRow.from_job(job, "failed", error="boom", attempts=3)
    assert (row.prompt, row.seed, row.width, row.composition_key) == ("cat", 5, 64, job.routing_key)
    assert json.loads(row.loras) == [{"uri": "s3://b/a", "strength": 0.5}]
    worker = {"job_id": "j", "status": "ok", "attempts": 1.0, "fetch_s": 1, "transient": False, "error": None}
    got = ResultRow.from_dict(worker)
    assert got.attempts == 1 and isinstance(got.fetch_s, float) and got.error == ""
    with pytest.raises(ValueError):
        ResultRow(job_id="j", status="done")


def test_row_constructors_for_worker_and_dispatcher():
    from jobs.results import COLUMNS

    job = validate_manifest({"jobs": [{"id": "j", "prompt": "cat", "loras": ["s3://b/a"]}]}).jobs[0]
    ok = ResultRow.ok(job, output_uri="out/images/j.png", composition_key="abc", worker_id="w0", fetch_s=0.1,
                      compose_s=0.2, render_s=0.3, lora_mode="merge")
    assert (ok.status, ok.prompt, ok.composition_key, ok.lora_mode, ok.attempts, ok.transient) == (
        "ok", "cat", "abc", "merge", 1, False)
    bad = ResultRow.failed(job, "OutOfMemoryError: boom", worker_id="w1", transient=True, fetch_s=0.5)
    assert (bad.status, bad.error, bad.composition_key, bad.transient, bad.fetch_s) == (
        "failed", "OutOfMemoryError: boom", "", True, 0.5)
    later = bad.recorded(3)
    assert later.attempts == 3 and later.finished_at >= bad.finished_at and later.error == bad.error
    # transient travels to the dispatcher but is not a results column
    assert "transient" not in COLUMNS and "transient" not in rows_to_table([bad]).column_names
    assert pickle.loads(pickle.dumps(ok)) == ok


def test_results_on_s3(tmp_path):
    moto = pytest.importorskip("moto.server")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"s3": {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}}
        fsspec.filesystem("s3", skip_instance_cache=True, **opts["s3"]).mkdir("farm")
        root = "s3://farm/run1"
        writer = ResultsWriter(root, opts)
        writer.append([ok("a", root), failed("b")])
        write_bytes_atomic(image_uri(root, "a"), b"png", opts)
        assert completed_jobs(root, opts) == {"a"}
        writer.finalize()
        assert {r.job_id for r in read_results(root, opts)} == {"a", "b"}
        assert completed_jobs(root, opts) == {"a"}
    finally:
        server.stop()


def test_manifests_and_results_do_not_import_torch():
    """`farm validate` must stay light: jobs/ uses lora_core's torch-free storage helpers."""
    import subprocess
    import sys

    code = ("import sys, jobs.manifest, jobs.results, jobs.validate, farm.cli; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
