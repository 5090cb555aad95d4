"""Results that are never lost: two writers on one root, a corrupt table, a row pyarrow cannot
hold, and error cells that would be megabytes (issue 14, "Data loss and crashes")."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import uuid

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs.results import ResultRow, ResultsWriter, read_results
from tests.storage.servers import MotoS3

PARTS, PER_PART = 12, 5


def ok(job_id: str, **kw) -> ResultRow:
    return ResultRow(job_id=job_id, status="ok", output_uri=f"x/{job_id}.png", worker_id="w0", **kw)


def write_and_finalize(root: str, opts: dict | None, name: str, barrier) -> None:
    """One "farm run": parts as jobs finish, a finalize now and then (as reruns do), one at the end."""
    writer = ResultsWriter(root, opts)
    barrier.wait()
    for i in range(PARTS):
        writer.append([ok(f"{name}-{i}-{k}") for k in range(PER_PART)])
        if i % 4 == 3:
            writer.finalize()
    writer.finalize()


def expected() -> set[str]:
    return {f"{n}-{i}-{k}" for n in ("a", "b") for i in range(PARTS) for k in range(PER_PART)}


def table_ids(root: str, opts: dict | None) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root, **((opts or {}).get("s3", {}) if root.startswith("s3") else {}))
    fs.invalidate_cache()
    with fs.open(f"{path}/results.parquet", "rb") as f:
        return pq.read_table(f).column("job_id").to_pylist()


def parts_left(root: str, opts: dict | None) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root, **((opts or {}).get("s3", {}) if root.startswith("s3") else {}))
    fs.invalidate_cache()
    try:
        return fs.ls(f"{path}/results.parts", detail=False)
    except FileNotFoundError:
        return []


def run_two(root: str, opts: dict | None, threads: bool) -> None:
    if threads:
        barrier = threading.Barrier(2)
        runs = [threading.Thread(target=write_and_finalize, args=(root, opts, n, barrier)) for n in "ab"]
    else:
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2)
        runs = [ctx.Process(target=write_and_finalize, args=(root, opts, n, barrier)) for n in "ab"]
    for r in runs:
        r.start()
    for r in runs:
        r.join(timeout=60)
    assert all(not r.is_alive() for r in runs)
    if not threads:
        assert [r.exitcode for r in runs] == [0, 0]


def assert_every_row_once(root: str, opts: dict | None) -> None:
    got = [r.job_id for r in read_results(root, opts)]
    assert len(got) == len(set(got)) and set(got) == expected(), f"{len(expected() - set(got))} rows lost"
    ids = table_ids(root, opts)  # the table alone (a pandas reader's view) holds every row, once
    assert len(ids) == len(set(ids)) == len(expected()) and set(ids) == expected()
    assert parts_left(root, opts) == [], "the last finalize merged every part"


def test_two_processes_into_one_local_root_land_every_row(tmp_path):
    root = str(tmp_path / "out")
    run_two(root, None, threads=False)
    assert_every_row_once(root, None)


def test_two_writers_into_one_memory_root_land_every_row():
    root = f"memory://two-{uuid.uuid4().hex[:8]}/out"
    run_two(root, None, threads=True)
    assert_every_row_once(root, None)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto.server")
    with MotoS3() as server:
        server.bucket = f"farm-{uuid.uuid4().hex[:8]}"  # moto's state is per process: other tests' buckets too
        server.fs().mkdir(server.bucket)
        yield server


def test_two_writers_into_one_s3_root_land_every_row(s3):
    root = f"s3://{s3.bucket}/two"
    run_two(root, s3.storage_options, threads=True)
    assert_every_row_once(root, s3.storage_options)


def test_a_finalize_that_lost_the_race_merges_again_on_s3(s3, monkeypatch):
    """A reads the table and parts, then, just before A writes its table, B appends a part and
    finalizes it (its table written, its part deleted): without a compare-and-swap A's table,
    read before B's part existed, replaces B's and B's rows are gone with the deleted part."""
    from storage.urls import open_filesystem

    root, opts = f"s3://{s3.bucket}/race", s3.storage_options
    a, b = ResultsWriter(root, opts), ResultsWriter(root, opts)
    a.append([ok("a1")])
    fs, _ = open_filesystem(f"{root}/results.parquet", opts)  # the instance the writers use
    real, raced = fs.pipe_file, []

    def race_then_put(path, data, **kw):
        if path.endswith("/results.parquet") and not raced:
            raced.append(path)
            b.append([ok("b1")])
            b.finalize()
        return real(path, data, **kw)

    monkeypatch.setattr(fs, "pipe_file", race_then_put)
    a.finalize()
    assert raced
    assert {r.job_id for r in read_results(root, opts)} == {"a1", "b1"}
    assert sorted(table_ids(root, opts)) == ["a1", "b1"] and parts_left(root, opts) == []


def test_without_lock_or_compare_and_swap_parts_stay_and_nothing_is_lost(monkeypatch):
    """A store with neither (gcs, sftp, ... here memory:// with its lock taken away): B
    finalizes while A is about to write a table read before B's part existed; A's table
    replaces B's, yet B's rows are still read, from its part, which no finalize removed."""
    import contextlib

    import jobs.results as results

    monkeypatch.setattr(results, "exclusive", lambda url, opts=None, timeout_s=-1: contextlib.nullcontext(False))
    root = f"memory://nolock-{uuid.uuid4().hex[:8]}/out"
    a, b = ResultsWriter(root), ResultsWriter(root)
    a.append([ok("a1")])
    real, raced = results.write_if_unchanged, []

    def race_then_write(url, data, version, opts=None):
        if not raced:
            raced.append(url)
            b.append([ok("b1")])
            b.finalize()
        return real(url, data, version, opts)

    monkeypatch.setattr(results, "write_if_unchanged", race_then_write)
    a.finalize()
    assert raced and table_ids(root, None) == ["a1"], "the stale table won the race"
    assert {r.job_id for r in read_results(root)} == {"a1", "b1"}
    assert len(parts_left(root, None)) == 2


def test_a_lock_held_too_long_leaves_the_parts_instead_of_hanging(tmp_path, monkeypatch, caplog):
    """A writer hung while holding the table's lock must not hang every other run's finalize."""
    import time

    from filelock import FileLock

    import jobs.results as results

    monkeypatch.setattr(results, "FINALIZE_LOCK_TIMEOUT_S", 0.3)
    root = str(tmp_path / "out")
    writer = ResultsWriter(root)
    writer.append([ok("a"), ok("b")])
    os.makedirs(root, exist_ok=True)
    held = FileLock(os.path.join(root, ".results.parquet.lock"))
    held.acquire()
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="jobs.results"):
            table = writer.finalize()
        assert time.monotonic() - t0 < 5 and sorted(table.column("job_id").to_pylist()) == ["a", "b"]
        assert ".results.parquet.lock" in caplog.text and "not merged" in caplog.text
        assert not os.path.exists(os.path.join(root, "results.parquet")) and len(parts_left(root, None)) == 1
        assert {r.job_id for r in read_results(root)} == {"a", "b"}
    finally:
        held.release()
    writer.finalize()
    assert sorted(table_ids(root, None)) == ["a", "b"] and parts_left(root, None) == []


@pytest.fixture(params=["local", "memory", "s3"])
def any_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None
    if request.param == "memory":
        return f"memory://corrupt-{uuid.uuid4().hex[:8]}/out", None
    server = request.getfixturevalue("s3")
    return f"s3://{server.bucket}/corrupt-{uuid.uuid4().hex[:8]}", server.storage_options


def test_an_unreadable_table_is_moved_aside_not_overwritten(any_root, caplog):
    root, opts = any_root
    fs, path = fsspec.core.url_to_fs(root, **((opts or {}).get("s3", {})))
    garbage = b"PAR1 this was a table once" * 50
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/results.parquet", garbage)
    writer = ResultsWriter(root, opts)
    writer.append([ok("new1"), ok("new2")])
    with caplog.at_level(logging.WARNING, logger="jobs.results"):
        writer.finalize()
    fs.invalidate_cache()
    aside = [p for p in fs.ls(path, detail=False) if os.path.basename(p).startswith("results.parquet.corrupt-")]
    assert len(aside) == 1 and fs.cat_file(aside[0]) == garbage, "the original bytes survive under the new name"
    assert os.path.basename(aside[0]) in caplog.text and "unreadable" in caplog.text
    assert sorted(table_ids(root, opts)) == ["new1", "new2"], "the run's rows land in a readable table"
    writer.append([ok("new3")])
    writer.finalize()  # the next finalize reads the new table: nothing more moved aside
    fs.invalidate_cache()
    assert len([p for p in fs.ls(path, detail=False) if ".corrupt-" in p]) == 1
    assert sorted(table_ids(root, opts)) == ["new1", "new2", "new3"]


def test_a_row_pyarrow_cannot_encode_fails_alone(tmp_path, caplog):
    """A lone surrogate (validation refuses it in manifests; any other caller may still send
    one) costs its own row: it lands as failed, saying why, and the rows beside it land."""
    root = str(tmp_path / "out")
    writer = ResultsWriter(root)
    bad = ok("bad", prompt="a cat \ud800 in the rain")
    with caplog.at_level(logging.ERROR, logger="jobs.results"):
        writer.append([ok("before"), bad, ok("after", prompt="ok")])
    writer.finalize()
    rows = {r.job_id: r for r in read_results(root)}
    assert set(rows) == {"before", "bad", "after"}
    assert rows["before"].status == rows["after"].status == "ok" and rows["after"].prompt == "ok"
    got = rows["bad"]
    assert got.status == "failed" and got.error.startswith("ResultEncodingError") and len(got.error) < 500
    assert "UnicodeEncodeError" in got.error and got.prompt == "a cat \\ud800 in the rain"
    assert "'bad'" in caplog.text


def test_error_cells_are_capped_on_every_path(tmp_path):
    from jobs import validate_manifest
    from jobs.results import MAX_ERROR_CHARS

    huge = "KeyError: " + "lora_unet_" * 200_000  # megabytes of key names
    job = validate_manifest({"jobs": [{"id": "j", "prompt": "cat"}]}).jobs[0]
    made = [ResultRow(job_id="j", status="failed", error=huge), ResultRow.failed(job, huge),
            ResultRow.from_dict({"job_id": "j", "status": "failed", "error": huge}),
            ResultRow.failed(job, "short").recorded(2)]
    for row in made[:3]:
        assert len(row.error) <= MAX_ERROR_CHARS and row.error.startswith("KeyError: lora_unet_")
        assert f"cut from {len(huge)} chars" in row.error
    assert made[3].error == "short"
    root = str(tmp_path / "out")
    writer = ResultsWriter(root)
    writer.append(made)
    writer.finalize()
    assert max(len(r.error) for r in read_results(root)) <= MAX_ERROR_CHARS
    assert os.path.getsize(os.path.join(root, "results.parquet")) < 100_000


def test_a_number_the_table_cannot_hold_fails_its_row_alone(tmp_path):
    root = str(tmp_path / "out")
    writer = ResultsWriter(root)
    writer.append([ok("a"), ok("huge", seed=2**70, prompt="x \udc80"), ok("c")])
    rows = {r.job_id: r for r in read_results(root)}
    assert (rows["a"].status, rows["c"].status, rows["huge"].status) == ("ok", "ok", "failed")
    assert rows["huge"].error.startswith("ResultEncodingError") and "UnicodeEncodeError" in rows["huge"].error
    assert rows["huge"].seed == 0, "a row that cannot hold even escaped keeps its id and error only"
