"""The state root: run records on local disk and memory://, secrets refused, stable run ids."""
from __future__ import annotations

import json
import logging
import posixpath
import uuid

import fsspec
import pytest

from farm.service.state import (
    RUN_STATES, RunRecord, StateRecordError, StateStore, run_id_for, strip_secrets,
)
from jobs.manifest import validate_manifest

MANIFEST = {
    "model": {"backend": "tiny"},
    "output": "/farm/out/cats",
    "storage_options": {"s3": {"key": "AKIA-SECRET", "secret": "hunter2"}},
    "jobs": [{"id": "cat-1", "prompt": "a cat", "seed": 1}, {"id": "cat-2", "prompt": "a cat", "seed": 2}],
}


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    """A state store on a local dir, and one on memory:// (removed afterwards)."""
    if request.param == "local":
        yield StateStore(str(tmp_path / "state"))
        return
    root = f"memory://state-{uuid.uuid4().hex}"
    yield StateStore(root)
    mem = fsspec.filesystem("memory")
    path = root[len("memory://"):]
    if mem.exists(path):
        mem.rm(path, recursive=True)


def record(run_id="r-0000000000000001", **changes) -> RunRecord:
    manifest, _ = strip_secrets(validate_manifest(MANIFEST).to_dict())
    return RunRecord(run_id=run_id, manifest=manifest, output="/farm/out/cats", **changes)


def raw_write(store: StateStore, name: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(f"{store.runs_dir}/{name}")
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def test_put_get_round_trip(store):
    rec = record(submitter="alice", priority=3, state="running", total=10, ok=4, failed=1,
                 created_at=100.5, updated_at=120.0, error="", has_secrets=True)
    assert store.get(rec.run_id) is None
    store.put(rec)
    assert store.get(rec.run_id) == rec
    assert StateStore(store.root).get(rec.run_id) == rec  # a restarted farm reads it back
    rec.state, rec.ok = "done", 9
    store.put(rec)  # replaced whole
    assert store.get(rec.run_id).state == "done" and store.get(rec.run_id).ok == 9
    assert [r.run_id for r in store.list()] == [rec.run_id]


def test_list_is_sorted_by_created_at(store):
    assert store.list() == []  # no runs dir yet
    for run_id, created in [("r-b", 30.0), ("r-a", 10.0), ("r-c", 20.0), ("r-d", 20.0)]:
        store.put(record(run_id, created_at=created))
    assert [r.run_id for r in store.list()] == ["r-a", "r-c", "r-d", "r-b"]


def test_delete(store):
    store.put(record("r-1"))
    store.put(record("r-2"))
    store.delete("r-1")
    assert store.get("r-1") is None
    assert [r.run_id for r in store.list()] == ["r-2"]
    store.delete("r-1")  # already gone: fine


def test_a_record_with_secrets_is_refused(store):
    with_secrets = RunRecord(run_id="r-1", manifest=validate_manifest(MANIFEST).to_dict(), output="o")
    with pytest.raises(ValueError, match="storage_options"):
        store.put(with_secrets)
    assert store.get("r-1") is None and store.list() == []
    # empty per-protocol options hold no secret: such a manifest may be stored
    store.put(RunRecord(run_id="r-2", manifest={"model": {}, "storage_options": {"s3": {}}}, output="o"))
    assert store.get("r-2") is not None


def test_strip_secrets():
    full = validate_manifest(MANIFEST).to_dict()
    stripped, had = strip_secrets(full)
    assert had and "storage_options" not in stripped and "storage_options" in full  # the input is left alone
    assert strip_secrets({"model": {}, "storage_options": {}}) == ({"model": {}}, False)
    assert strip_secrets({"model": {}, "storage_options": {"s3": {}}})[1] is False


def test_stored_bytes_hold_no_secret(tmp_path):
    store = StateStore(str(tmp_path))
    store.put(record("r-1", has_secrets=True))
    text = (tmp_path / "runs" / "r-1.json").read_text()
    assert "AKIA-SECRET" not in text and "hunter2" not in text
    assert json.loads(text)["has_secrets"] is True


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", ".hidden", "", "r 1", "x" * 129, None])
def test_unsafe_run_ids_never_become_paths(store, bad):
    with pytest.raises(ValueError, match="invalid run id"):
        store.get(bad)
    with pytest.raises(ValueError, match="invalid run id"):
        store.delete(bad)
    with pytest.raises(ValueError, match="invalid run id"):
        store.put(RunRecord(run_id=bad, manifest={}, output="o"))


def test_put_refuses_an_unknown_state(store):
    with pytest.raises(ValueError, match="state must be one of"):
        store.put(record(state="paused"))


def test_unreadable_records_are_skipped(store, caplog):
    store.put(record("r-good", created_at=1.0))
    raw_write(store, "r-garbage.json", b"{not json")
    raw_write(store, "r-badfield.json", json.dumps({"run_id": "r-badfield", "manifest": {}, "output": "o",
                                                    "state": "exploded"}).encode())
    raw_write(store, "r-renamed.json", record("r-other").to_json())  # says it is another run
    raw_write(store, ".r-good.json.0123abcd.tmp", b"half a fi")      # a writer's temp file: not a record
    raw_write(store, "README", b"not ours")
    with caplog.at_level(logging.WARNING, logger="farm.service.state"):
        runs = store.list()
    assert [r.run_id for r in runs] == ["r-good"]
    warned = caplog.text
    for name in ("r-garbage.json", "r-badfield.json", "r-renamed.json"):
        assert name in warned
    assert "state: must be one of" in warned
    assert ".tmp" not in warned and "README" not in warned
    with pytest.raises(StateRecordError, match="r-garbage.json: run record: not JSON"):
        store.get("r-garbage")
    with pytest.raises(StateRecordError, match="r-renamed.json: run_id: the record says 'r-other'"):
        store.get("r-renamed")


def test_record_json_round_trip_and_active():
    rec = record(state="running", created_at=5, total=3)
    assert RunRecord.from_json(rec.to_json()) == rec
    assert rec.to_json() == RunRecord.from_json(rec.to_json()).to_json()
    assert [RunRecord("r", {}, "o", state=s).active for s in RUN_STATES] == [True, True, False, False, False]
    # a key this version does not know (a newer farm wrote it) is ignored
    newer = json.loads(rec.to_json())
    newer["shiny_new_field"] = 1
    assert RunRecord.from_json(json.dumps(newer).encode()) == rec


@pytest.mark.parametrize("change, field", [
    ({"run_id": "../x"}, "run_id"),
    ({"manifest": []}, "manifest"),
    ({"output": 3}, "output"),
    ({"priority": True}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"state": "paused"}, "state"),
    ({"total": -1}, "total"),
    ({"ok": "3"}, "ok"),
    ({"failed": None}, "failed"),
    ({"created_at": "yesterday"}, "created_at"),
    ({"has_secrets": "no"}, "has_secrets"),
    ({"error": 1}, "error"),
])
def test_malformed_records_name_the_field(change, field):
    data = {**json.loads(record().to_json()), **change}
    with pytest.raises(StateRecordError, match=f"run record: {field}: must be"):
        RunRecord.from_json(json.dumps(data).encode())


@pytest.mark.parametrize("missing", ["run_id", "manifest", "output"])
def test_missing_required_fields_are_named(missing):
    data = json.loads(record().to_json())
    del data[missing]
    with pytest.raises(StateRecordError, match=f"run record: {missing}: required"):
        RunRecord.from_json(json.dumps(data).encode())


def test_not_an_object():
    with pytest.raises(StateRecordError, match="must be a JSON object"):
        RunRecord.from_json(b"[1, 2]")


def test_run_id_is_stable_across_resubmission():
    first = validate_manifest(MANIFEST).to_dict()
    again = validate_manifest(json.loads(json.dumps(MANIFEST))).to_dict()
    run_id = run_id_for(first, first["output"])
    assert run_id.startswith("r-") and len(run_id) == 18 and int(run_id[2:], 16) >= 0
    assert run_id_for(again, again["output"]) == run_id
    # new credentials, or jobs listed in another order: the same run
    rekeyed = validate_manifest({**MANIFEST, "storage_options": {"s3": {"key": "OTHER"}}}).to_dict()
    assert run_id_for(rekeyed, rekeyed["output"]) == run_id
    reordered = validate_manifest({**MANIFEST, "jobs": MANIFEST["jobs"][::-1]}).to_dict()
    assert run_id_for(reordered, reordered["output"]) == run_id
    stripped, _ = strip_secrets(first)
    assert run_id_for(stripped, first["output"]) == run_id


@pytest.mark.parametrize("change", [
    {"output": "/farm/out/dogs"},
    {"model": {"backend": "tiny", "dtype": "float16"}},
    {"options": {"lora_mode": "merge"}},
    {"jobs": MANIFEST["jobs"][:1]},
])
def test_run_id_changes_with_what_the_run_is(change):
    base = validate_manifest(MANIFEST).to_dict()
    other = validate_manifest({**MANIFEST, **change}).to_dict()
    assert run_id_for(other, other["output"]) != run_id_for(base, base["output"])
    assert run_id_for(base, "/farm/out/dogs") != run_id_for(base, base["output"])


def test_store_repr_hides_options():
    store = StateStore("memory://x", {"s3": {"secret": "hunter2"}})
    assert "hunter2" not in repr(store)
    with pytest.raises(ValueError, match="state root"):
        StateStore("  ")
