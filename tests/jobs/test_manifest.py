"""Manifest validation: every problem at once with its path, ids, compositions, defaults."""
from __future__ import annotations

import os
import pickle

import pytest

from jobs import Job, LoraRef, ManifestError, validate_manifest
from jobs.manifest import job_content_id
from jobs.options import LORA_MODES, FarmOptions
from jobs.validate import RENDER_DEFAULTS

SHA = "ab" * 32


def problems_of(data, **kw) -> list[str]:
    with pytest.raises(ManifestError) as info:
        validate_manifest(data, **kw)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_every_problem_is_reported_at_once_with_its_path():
    data = {"jobs": [
        {"prompt": "ok", "colour": "red"},
        {"prompt": "a", "steps": -3},
        {"seed": 1},
        {"prompt": "b", "loras": [{"uri": "x.safetensors", "strength": "high"}]},
    ]}
    assert problems_of(data) == [
        "jobs[0]: unknown field 'colour'",
        "jobs[1].steps: must be >= 1 (got int -3)",
        "jobs[2].prompt: required",
        "jobs[3].loras[0].strength: not a number (got str 'high')",
    ]


def test_problems_in_every_section_are_collected_together():
    data = {
        "modle": {},
        "model": {"backend": "nunchaku"},
        "defaults": {"steps": 0, "width": 100, "colour": 1},
        "options": {"lora_mode": "fast", "max_batch": 0, "retries": -1, "turbo": True},
        "storage_options": {"nosuchproto": {}, "s3": "key=1"},
        "output": 3,
        "jobs": [{"prompt": "x", "height": 4097}],
    }
    got = problems_of(data)
    expected = [
        "manifest: unknown field 'modle' (did you mean 'model'?)",
        "model.path: required for backend 'nunchaku'",
        "defaults: unknown field 'colour'",
        "defaults.steps: must be >= 1",
        "defaults.width: must be a multiple of 16",
        "output: not a string",
        "storage_options.nosuchproto: unknown fsspec protocol",
        "storage_options.s3: must be a mapping",
        "options: unknown field 'turbo'",
        "options.lora_mode: must be one of merge, lowrank, auto",
        "options.max_batch: must be >= 1",
        "options.retries: must be >= 0",
        "jobs[0].height: must be <= 4096",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in got), (text, got)
    assert len(got) == len(expected)


@pytest.mark.parametrize("field,value,reason", [
    ("seed", -1, "must be >= 0"),
    ("seed", True, "not an integer"),          # booleans are not numbers
    ("seed", 1.5, "not an integer"),
    ("steps", 1001, "must be <= 1000"),
    ("steps", "4", "not an integer"),
    ("width", 8, "must be >= 16"),
    ("width", 250, "must be a multiple of 16"),
    ("guidance", -0.5, "must be >= 0"),
    ("guidance", False, "not a number"),
    ("guidance", float("nan"), "not a finite number"),
    ("priority", "high", "not an integer"),
    ("negative_prompt", 3, "not a string"),
    ("prompt", "   ", "must not be empty"),
    ("prompt", ["a"], "not a string"),
    ("loras", "x.safetensors", "must be a list"),
])
def test_field_rules(field, value, reason):
    [problem] = problems_of({"jobs": [{"prompt": "p", field: value}]})
    assert problem.startswith(f"jobs[0].{field}: {reason}"), problem


@pytest.mark.parametrize("lora,path,reason", [
    ({"strength": 1.0}, "uri", "required"),
    ({"uri": ""}, "uri", "must not be empty"),
    ({"uri": "a", "strength": True}, "strength", "not a number"),
    ({"uri": "a", "sha256": "abc"}, "sha256", "must be 64 hex digits"),
    ({"uri": "a", "weight": 1}, "", "unknown field 'weight'"),
])
def test_lora_rules(lora, path, reason):
    [problem] = problems_of({"jobs": [{"prompt": "p", "loras": [lora]}]})
    where = "jobs[0].loras[0]" + (f".{path}" if path else "")
    assert problem.startswith(f"{where}: {reason}"), problem


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "a..b", ".hidden", "", "x" * 129, "sp ace", 7])
def test_unsafe_ids_are_rejected(bad):
    [problem] = problems_of({"jobs": [{"id": bad, "prompt": "p"}]})
    assert problem.startswith("jobs[0].id: ")


def test_duplicate_ids_and_duplicate_content_are_errors():
    got = problems_of({"jobs": [
        {"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"},
        {"prompt": "same"}, {"prompt": "same"},
    ]})
    assert got[0] == "jobs[1]: duplicate id 'a' (also jobs[0])"
    assert got[1].startswith("jobs[3]: same content as jobs[2]")


def test_no_jobs_is_an_error():
    assert problems_of({"model": {"backend": "tiny"}}) == ["jobs: no jobs: give 'jobs', 'matrix' or 'jobs_file'"]
    assert problems_of(["not a mapping"]) == ["jobs[0]: must be a mapping (got str 'not a mapping')"]
    assert problems_of("text")[0].startswith("manifest: must be a mapping")


def test_defaults_apply_and_jobs_override_them():
    m = validate_manifest({
        "defaults": {"steps": 8, "width": 512, "negative_prompt": "blurry"},
        "jobs": [{"prompt": "a"}, {"prompt": "b", "steps": 2, "height": 64, "guidance": 3}],
    })
    a, b = m.jobs
    assert (a.steps, a.width, a.height, a.negative_prompt) == (8, 512, RENDER_DEFAULTS["height"], "blurry")
    assert (b.steps, b.height, b.guidance) == (2, 64, 3.0) and isinstance(b.guidance, float)
    assert m.options == FarmOptions()
    assert m.options.as_dict() == {"lora_mode": "auto", "max_batch": 4, "retries": 2, "fp8": False,
                                   "memory_reserve_gb": None, "merge_strategy": "keep_until_full", "branch_cache_mb": 1024,
                                   "max_lora_mb": 4096}
    assert m.model == {"backend": "tiny"}


def test_derived_ids_are_content_hashes():
    def only_id(**job):
        return validate_manifest({"jobs": [{"prompt": "cat", **job}]}).jobs[0].job_id

    base = only_id(seed=1, loras=[{"uri": "s3://b/a"}, {"uri": "s3://b/c", "strength": 0.5}])
    assert len(base) == 16 and int(base, 16) >= 0
    assert only_id(seed=1, loras=[{"uri": "s3://b/c", "strength": 0.5}, "s3://b/a"]) == base  # order-free
    assert only_id(seed=2, loras=[{"uri": "s3://b/a"}, {"uri": "s3://b/c", "strength": 0.5}]) != base
    assert only_id(seed=1) != base
    assert only_id(seed=1, priority=9) == only_id(seed=1)  # priority does not change the image
    assert only_id(seed=1, guidance=1) == only_id(seed=1, guidance=1.0)
    # a checksum names the content: the same file under another URL is the same render
    assert only_id(loras=[{"uri": "s3://b/a", "sha256": SHA}]) == only_id(loras=[{"uri": "loras/a", "sha256": SHA}])


def test_derived_id_includes_the_model():
    data = {"jobs": [{"prompt": "cat"}]}
    tiny = validate_manifest(data).jobs[0].job_id
    other = validate_manifest({**data, "model": {"backend": "diffusers", "path": "/models/x"}}).jobs[0].job_id
    assert tiny != other
    fields = {**RENDER_DEFAULTS, "prompt": "cat", "loras": []}
    assert job_content_id(fields, {"backend": "tiny"}) == tiny


def test_routing_key_is_order_insensitive_and_rounded():
    def job(*loras: LoraRef) -> Job:
        return Job("j", "p", 0, tuple(loras), 4, 64, 64, 1.0)

    a, b = LoraRef("s3://x/a", 0.8), LoraRef("s3://x/b", 1.0, SHA)
    assert job(a, b).routing_key == job(b, a).routing_key != ""
    assert job(a, b).routing_key == job(LoraRef("s3://x/a", 0.8000000001), b).routing_key
    assert job(a, b).routing_key != job(LoraRef("s3://x/a", 0.81), b).routing_key
    assert job(a).routing_key != job(LoraRef("s3://x/a", 0.8, SHA)).routing_key
    assert job().routing_key == ""


def test_relative_paths_resolve_against_the_manifest_dir(tmp_path):
    base, absolute = str(tmp_path), str(tmp_path.parent / "d.safetensors")  # outside base, under the suite's LoRA root
    m = validate_manifest({
        "model": {"backend": "diffusers", "path": "models/pipe"},
        "output": "renders",
        "jobs": [{"prompt": "p", "loras": ["loras/a.safetensors", "s3://b/c.safetensors", absolute]}],
    }, base_dir=base)
    assert m.model["path"] == os.path.join(base, "models", "pipe")
    assert m.output == os.path.join(base, "renders")
    assert [r.uri for r in m.jobs[0].loras] == [
        os.path.join(base, "loras", "a.safetensors"), "s3://b/c.safetensors", absolute]
    assert validate_manifest({"jobs": [{"prompt": "p"}]}, base_dir=base).output == os.path.join(base, "out")


def test_relative_paths_next_to_a_url_manifest_become_urls():
    m = validate_manifest({"output": "../out/", "jobs": [{"prompt": "p", "loras": ["loras/a.safetensors"]}]},
                          base_dir="s3://bucket/manifests")
    assert m.jobs[0].loras[0].uri == "s3://bucket/manifests/loras/a.safetensors"
    assert m.output == "s3://bucket/out"
    assert validate_manifest({"output": "memory://farm/out/", "jobs": [{"prompt": "p"}]}).output == "memory://farm/out"


def test_sha256_is_normalized_and_null_fields_mean_absent():
    m = validate_manifest({"jobs": [{"prompt": "p", "seed": None, "loras": [{"uri": "a", "sha256": SHA.upper()}]}]})
    assert m.jobs[0].loras[0].sha256 == SHA and m.jobs[0].seed == 0


def test_to_dict_round_trips():
    m = validate_manifest({
        "model": {"backend": "diffusers", "path": "/m", "dtype": "bfloat16", "args": {"variant": "fp16"}},
        "storage_options": {"s3": {"endpoint_url": "http://127.0.0.1:9000"}},
        "options": {"lora_mode": "lowrank", "max_batch": 2, "retries": 0},
        "output": "s3://bucket/out",
        "jobs": [{"prompt": "p", "priority": 3, "loras": [{"uri": "s3://b/a", "strength": -0.5, "sha256": SHA}]}],
    })
    assert validate_manifest(m.to_dict()) == m
    row = m.jobs[0].to_row()
    assert row["job_id"] == m.jobs[0].job_id and row["loras"].startswith("[{")


def test_caller_storage_options_merge_over_the_manifest():
    m = validate_manifest({"storage_options": {"s3": {"key": "a", "secret": "b"}}, "jobs": [{"prompt": "p"}]},
                          storage_options={"s3": {"key": "override"}, "http": {"block_size": 0}})
    assert m.storage_options == {"s3": {"key": "override", "secret": "b"}, "http": {"block_size": 0}}


def test_errors_and_jobs_survive_pickling():  # both cross Ray process boundaries
    err = ManifestError(["a: x", "b: y"])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == ["a: x", "b: y"] and str(back) == "a: x\nb: y"
    m = validate_manifest({"jobs": [{"prompt": "p", "loras": ["s3://b/a"]}]})
    assert pickle.loads(pickle.dumps(m)) == m


def test_model_options_validated():
    from jobs.manifest import ManifestError, validate_manifest

    with pytest.raises(ManifestError) as e:
        validate_manifest({"jobs": [{"prompt": "x"}],
                           "options": {"fp8": "yes", "memory_reserve_gb": -1, "merge_strategy": "lru",
                                       "branch_cache_mb": "lots"}})
    text = str(e.value)
    assert "options.fp8" in text and "options.memory_reserve_gb" in text and "options.merge_strategy" in text
    assert "options.branch_cache_mb" in text
    m = validate_manifest({"jobs": [{"prompt": "x"}], "options": {"fp8": True, "memory_reserve_gb": 2, "merge_strategy": "rotate"}})
    assert (m.options.fp8, m.options.memory_reserve_gb, m.options.merge_strategy) == (True, 2.0, "rotate")


def test_farm_options_declare_defaults_and_choices_once():
    from lora_core.modes import APPLY_MODES

    assert LORA_MODES == (*APPLY_MODES, "auto")
    m = validate_manifest({"jobs": [{"prompt": "x"}], "options": {"max_batch": 2, "lora_mode": "merge"}})
    assert m.options == FarmOptions(max_batch=2, lora_mode="merge")
    assert pickle.loads(pickle.dumps(m.options)) == m.options  # crosses to Ray actors
    assert m.options.override(max_batch=None, lora_mode="lowrank") == FarmOptions(max_batch=2, lora_mode="lowrank")
    assert m.options.model_options() == {"lora_mode": "merge", "fp8": False, "memory_reserve_gb": None,
                                         "merge_strategy": "keep_until_full", "branch_cache_mb": 1024}
    with pytest.raises(ManifestError) as e:
        validate_manifest({"jobs": [{"prompt": "x"}], "options": {"lora_mode": "fast", "max_batch": 0, "retry": 1}})
    assert e.value.problems == [
        "options: unknown field 'retry' (did you mean 'retries'?)",
        "options.lora_mode: must be one of merge, lowrank, auto (got str 'fast')",
        "options.max_batch: must be >= 1 (got int 0)",
    ]
