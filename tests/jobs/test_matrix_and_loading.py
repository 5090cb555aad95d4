"""The matrix form, and loading manifests from YAML, JSON, JSONL, Parquet and fsspec URLs."""
from __future__ import annotations

import gzip
import json
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import ManifestError, load_manifest, validate_manifest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def problems_of(fn, *args, **kw) -> list[str]:
    with pytest.raises(ManifestError) as info:
        fn(*args, **kw)
    return info.value.problems


MATRIX = {
    "prompts": ["a cat", "a dog", "a fox"],
    "seeds": [1, 2],
    "lora_sets": [[], [{"uri": "s3://b/style.safetensors", "strength": 0.8}], ["s3://b/a", "s3://b/c"]],
}


def test_matrix_expands_prompts_by_seeds_by_lora_sets():
    jobs = validate_manifest({"matrix": MATRIX}).jobs
    assert len(jobs) == 3 * 2 * 3
    assert len({j.job_id for j in jobs}) == 18
    assert {(j.prompt, j.seed, j.routing_key) for j in jobs} == {
        (p, s, c) for p in MATRIX["prompts"] for s in (1, 2) for c in {j.routing_key for j in jobs}
    }
    assert len({j.routing_key for j in jobs}) == 3 and "" in {j.routing_key for j in jobs}


def test_matrix_ids_with_prefix_and_overrides():
    m = validate_manifest({
        "defaults": {"steps": 8},
        "matrix": {**MATRIX, "id_prefix": "grid", "width": 512, "priority": 2},
    })
    ids = [j.job_id for j in m.jobs]
    assert ids[:4] == ["grid-p0-l0-s1", "grid-p0-l0-s2", "grid-p0-l1-s1", "grid-p0-l1-s2"]
    assert ids[-1] == "grid-p2-l2-s2"
    assert {(j.width, j.steps, j.priority) for j in m.jobs} == {(512, 8, 2)}


def test_matrix_list_seed_range_and_jobs_together():
    m = validate_manifest({
        "jobs": [{"id": "single", "prompt": "x"}],
        "matrix": [
            {"prompts": ["a"], "seeds": {"start": 10, "count": 5}},
            {"prompts": ["b", "c"], "id_prefix": "m2"},  # default seed, no-LoRA set
        ],
    })
    assert [j.seed for j in m.jobs[1:6]] == [10, 11, 12, 13, 14]
    assert [j.job_id for j in m.jobs[6:]] == ["m2-p0-l0-s0", "m2-p1-l0-s0"]
    assert m.jobs[0].job_id == "single" and len(m.jobs) == 8


def test_matrix_problems_are_reported_once_per_axis():
    got = problems_of(validate_manifest, {"matrix": {
        "prompts": ["ok", ""], "seeds": [1, -2], "id_prefix": "../x", "steps": 0, "colour": 1,
        "lora_sets": [[], [{"uri": "a", "strength": "high"}]],
    }})
    assert got == [
        "matrix: unknown field 'colour'",
        "matrix.steps: must be >= 1 (got int 0)",
        "matrix.prompts[1]: must not be empty",
        "matrix.seeds[1]: must be >= 0 (got int -2)",
        "matrix.lora_sets[1][0].strength: not a number (got str 'high')",
        "matrix.id_prefix: invalid id '../x': use 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'",
    ]
    assert problems_of(validate_manifest, {"matrix": {"seeds": [1]}}) == ["matrix.prompts: required"]


def test_matrix_duplicates_and_limits():
    got = problems_of(validate_manifest, {"matrix": {"prompts": ["a"], "seeds": [1, 1], "id_prefix": "g"}})
    assert got == ["matrix(prompts[0], lora_sets[0], seed 1): duplicate id 'g-p0-l0-s1' "
                   "(also matrix(prompts[0], lora_sets[0], seed 1))"]
    got = problems_of(validate_manifest, {"matrix": {"prompts": ["a"] * 1000, "seeds": {"count": 1001}}})
    assert got == ["matrix: expands to 1001000 jobs (limit 1000000)"]


# ---- loading -----------------------------------------------------------------------------
JOBS = [
    {"id": "one", "prompt": "a cat", "seed": 1, "loras": [{"uri": "loras/a.safetensors", "strength": 0.5}]},
    {"prompt": "a dog", "seed": 2, "steps": 8},
]


def test_yaml_and_json_load_the_same(tmp_path):
    body = {"defaults": {"width": 128}, "jobs": JOBS}
    (tmp_path / "m.json").write_text(json.dumps(body))
    import yaml

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(body))
    a, b = load_manifest(tmp_path / "m.json"), load_manifest(str(tmp_path / "m.yaml"))
    assert a == b and len(a.jobs) == 2
    assert a.jobs[0].loras[0].uri == str(tmp_path / "loras" / "a.safetensors")
    assert a.output == str(tmp_path / "out")


def test_jsonl_is_a_jobs_only_manifest(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(j) for j in JOBS) + "\n\n")
    m = load_manifest(path)
    assert m.model == {"backend": "tiny"} and [j.seed for j in m.jobs] == [1, 2]
    gz = tmp_path / "jobs.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert load_manifest(gz) == m


def test_jsonl_reports_bad_lines_and_bad_jobs_together(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json\n{"prompt": "x", "steps": 0}\n')
    got = problems_of(load_manifest, path)
    assert len(got) == 2
    assert got[0].startswith(f"{path} line 2: invalid JSON")
    assert got[1] == "jobs[2].steps: must be >= 1 (got int 0)"


def test_parquet_jobs_nulls_and_json_loras(tmp_path):
    table = pa.Table.from_pylist([
        {"id": "p1", "prompt": "a", "seed": 1, "steps": None,
         "loras": [{"uri": "s3://b/x", "strength": 0.5, "sha256": None}]},
        {"id": "p2", "prompt": "b", "seed": 2, "steps": 6, "loras": []},
    ])
    pq.write_table(table, tmp_path / "jobs.parquet")
    m = load_manifest(tmp_path / "jobs.parquet")
    assert [(j.job_id, j.steps) for j in m.jobs] == [("p1", 4), ("p2", 6)]
    assert m.jobs[0].loras[0].uri == "s3://b/x" and m.jobs[0].loras[0].sha256 is None
    # loras as a JSON string column: the easy way to write them from pandas
    flat = pa.table({"prompt": ["c"], "loras": [json.dumps([{"uri": "s3://b/y"}])]})
    pq.write_table(flat, tmp_path / "flat.parquet")
    assert load_manifest(tmp_path / "flat.parquet").jobs[0].loras[0].uri == "s3://b/y"


def test_jobs_file_from_yaml(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in JOBS))
    (tmp_path / "m.yaml").write_text(
        "model: {backend: tiny}\ndefaults: {steps: 12}\njobs_file: big/jobs.jsonl\n"
        "jobs:\n  - {id: inline, prompt: hi}\n")
    m = load_manifest(tmp_path / "m.yaml")
    assert [j.job_id for j in m.jobs][:2] == ["inline", "one"]  # inline jobs first, then the file's
    assert [j.steps for j in m.jobs] == [12, 12, 8]
    # LoRA paths in the jobs file resolve against the manifest's directory
    assert m.jobs[1].loras[0].uri == str(tmp_path / "loras" / "a.safetensors")
    (tmp_path / "bad.yaml").write_text("jobs_file: missing.jsonl\n")
    [problem] = problems_of(load_manifest, tmp_path / "bad.yaml")
    assert problem.startswith("jobs_file: cannot read") and "missing.jsonl" in problem


def test_parse_errors_and_duplicate_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text("jobs: [\n")
    assert problems_of(load_manifest, tmp_path / "bad.yaml")[0].startswith(f"{tmp_path / 'bad.yaml'}: invalid YAML")
    (tmp_path / "dup.yaml").write_text("jobs:\n  - prompt: a\n    seed: 1\n    seed: 2\n")
    assert problems_of(load_manifest, tmp_path / "dup.yaml") == [f"{tmp_path / 'dup.yaml'}: line 4: duplicate key 'seed'"]
    (tmp_path / "dup.json").write_text('{"jobs": [{"prompt": "a", "prompt": "b", "steps": 0}]}')
    assert problems_of(load_manifest, tmp_path / "dup.json") == [
        f"{tmp_path / 'dup.json'}: duplicate key 'prompt'", "jobs[0].steps: must be >= 1 (got int 0)"]
    [missing] = problems_of(load_manifest, tmp_path / "nope.yaml")
    assert missing.startswith(f"{tmp_path / 'nope.yaml'}: cannot read: FileNotFoundError")
    (tmp_path / "empty.yaml").write_text("")
    assert problems_of(load_manifest, tmp_path / "empty.yaml") == [f"{tmp_path / 'empty.yaml'}: empty manifest"]


def test_manifest_from_an_fsspec_url():
    root = f"memory://manifests-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/m.yaml", b"jobs:\n  - {prompt: p, loras: [loras/a.safetensors]}\n")
    m = load_manifest(f"{root}/m.yaml")
    assert m.jobs[0].loras[0].uri == f"{root}/loras/a.safetensors"
    assert m.output == f"{root}/out"


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(EXAMPLES) if n.endswith((".yaml", ".yml", ".json"))))
def test_examples_validate(name):
    m = load_manifest(os.path.join(EXAMPLES, name))  # validation does not touch LoRA files
    assert m.jobs and all(j.prompt for j in m.jobs)


def test_matrix_example_expands_as_documented():
    m = load_manifest(os.path.join(EXAMPLES, "matrix.yaml"))
    assert len(m.jobs) == 3 * 4 * 2 and len({j.routing_key for j in m.jobs}) == 4
    assert m.jobs[0].job_id == "sweep-p0-l0-s1"
    assert m.jobs[2].loras[0].uri == os.path.join(os.path.abspath(EXAMPLES), "loras", "palette.safetensors")
