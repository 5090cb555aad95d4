"""FARM.yaml: validation with every problem at once, per_gpu counts, pool matching, round trips."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from farm.service.config import (
    MAX_WORKERS, FarmConfig, FarmConfigError, PoolConfig, load_farm_config, parse_farm_config,
)
from jobs.manifest import load_manifest, validate_manifest
from jobs.options import FarmOptions

DESIGN_EXAMPLE = """\
pools:
  - {name: qwen, model: {backend: tiny}, workers: 2}   # workers: N | per_gpu; gpus_per_worker: 1
state: /var/lib/lora-farm          # any fsspec URL: runs recorded here survive restarts
submitters: {alice: 1, bob: 2}     # optional weights for fair share (default 1)
"""


def tiny_pool(**extra):
    return {"name": "qwen", "model": {"backend": "tiny"}, "workers": 2, **extra}


def test_design_example_loads(tmp_path):
    path = tmp_path / "FARM.yaml"
    path.write_text(DESIGN_EXAMPLE)
    config = load_farm_config(str(path))
    (pool,) = config.pools
    assert pool == PoolConfig(name="qwen", model={"backend": "tiny"}, workers=2)
    assert (pool.gpus_per_worker, pool.adapter_cache_mb, pool.node_cache_dir, pool.options) == (1.0, 2048, None, {})
    assert config.state == "/var/lib/lora-farm"
    assert config.weight("alice") == 1.0 and config.weight("bob") == 2.0
    assert config.weight("carol") == 1.0  # not listed: weighs 1
    assert config.fair_share is True  # on unless the config says otherwise


def test_every_problem_is_listed_at_once():
    bad = {
        "pools": [
            {"name": "Bad Name!", "model": {"backend": "nope"}, "workers": 0, "gpus_per_worker": 9,
             "adapter_cache_mb": "big", "colour": "red"},
            {"name": "cpu", "model": {"backend": "diffusers"}, "workers": "per_gpu", "gpus_per_worker": 0,
             "node_cache_dir": "s3://bucket/cache", "node_cache_mb": 0,
             "options": {"lora_mode": "sideways", "max_batch": 0, "speed": 11}},
            {"name": "third", "model": {"backend": "tiny"}, "workers": "many"},
        ],
        "submitters": {"alice": 0, "bob": "heavy"},
        "storage_options": {"nosuchproto": {}},
        "extra": True,
    }
    with pytest.raises(FarmConfigError) as info:
        parse_farm_config(bad)
    problems = info.value.problems
    expected = [
        "config: unknown field 'extra'",
        "pools[0]: unknown field 'colour'",
        "pools[0].name: invalid pool name",
        "pools[0].model.backend: must be one of",
        "pools[0].workers: must be >= 1",
        "pools[0].gpus_per_worker: must be <= 8",
        "pools[0].adapter_cache_mb: not an integer",
        "pools[1].model.path: required for backend 'diffusers'",
        "pools[1].workers: per_gpu needs gpus_per_worker > 0",
        "pools[1].node_cache_dir: must be a local directory",
        "pools[1].node_cache_mb: must be >= 1",
        "pools[1].options.lora_mode: must be one of",
        "pools[1].options.max_batch: must be >= 1",
        "pools[1].options: unknown field 'speed'",
        "pools[2].workers: must be an integer 1..256 or 'per_gpu'",
        "state: required",
        "submitters.alice: must be > 0",
        "submitters.bob: not a number",
        "storage_options.nosuchproto: unknown fsspec protocol",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(expected), problems
    # the message is the list, one per line; it survives pickling (Ray) as a list
    assert str(info.value).splitlines() == problems
    assert pickle.loads(pickle.dumps(info.value)).problems == problems


@pytest.mark.parametrize("data, problem", [
    ([], "config: must be a mapping"),
    ({"state": "s"}, "pools: required"),
    ({"pools": [], "state": "s"}, "pools: must not be empty"),
    ({"pools": {"name": "a"}, "state": "s"}, "pools: must be a list"),
    ({"pools": [tiny_pool()], "state": ""}, "state: must not be empty"),
    ({"pools": [tiny_pool()], "state": "nosuchproto://x"}, "state: unknown fsspec protocol"),
    ({"pools": [tiny_pool(workers=MAX_WORKERS + 1)], "state": "s"}, "pools[0].workers: must be <= 256"),
    ({"pools": [tiny_pool(workers=True)], "state": "s"}, "pools[0].workers: not an integer"),
    ({"pools": [tiny_pool(gpus_per_worker=-0.5)], "state": "s"}, "pools[0].gpus_per_worker: must be >= 0"),
    ({"pools": [tiny_pool(node_cache_dir="/c/{host}")], "state": "s"}, "pools[0].node_cache_dir: only the placeholder"),
    ({"pools": [{"model": {"backend": "tiny"}}], "state": "s"}, "pools[0].name: required"),
    ({"pools": [tiny_pool(), tiny_pool(model={"backend": "tiny", "dtype": "float32"})], "state": "s"},
     "pools[1].name: duplicate pool name 'qwen' (also pools[0])"),
    ({"pools": [tiny_pool(), tiny_pool(name="other")], "state": "s"},
     "pools[1].model: same model as pools[0] ('qwen')"),
    ({"pools": [tiny_pool()], "state": "s", "submitters": ["alice"]}, "submitters: must be a mapping"),
    ({"pools": [tiny_pool()], "state": "s", "submitters": {"": 1}}, "submitters: a submitter name must be"),
    ({"pools": [tiny_pool()], "state": "s", "fair_share": "yes"}, "fair_share: not a boolean"),
])
def test_single_problems(data, problem):
    with pytest.raises(FarmConfigError) as info:
        parse_farm_config(data, "/base")
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_nesting_is_bounded():
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["args"] = {}
        node = node["args"]
    with pytest.raises(FarmConfigError) as info:
        parse_farm_config({"pools": [tiny_pool(model={"backend": "tiny", "args": deep})], "state": "s"})
    assert info.value.problems == ["config: nested more than 32 levels deep (jobs.limits.MAX_NESTING)"]


@pytest.mark.parametrize("gpus_per_worker, cluster_gpus, expected", [
    (1.0, 3, 3),
    (1.0, 8, 8),
    (0.5, 3, 6),
    (0.1, 3, 30),
    (0.2, 0.6, 3),    # 0.6 / 0.2 is 2.9999999999999996 in floating point
    (2.0, 3, 1),      # rounded down
    (2.0, 8, 4),
    (1.0, 0, 1),      # a cluster without GPUs still gets one worker
    (4.0, 1, 1),      # fewer GPUs than one worker asks for: still one
])
def test_per_gpu_worker_count(gpus_per_worker, cluster_gpus, expected):
    config = parse_farm_config({"pools": [tiny_pool(workers="per_gpu", gpus_per_worker=gpus_per_worker)],
                                "state": "/s"})
    assert config.pools[0].workers == "per_gpu"
    assert config.pools[0].worker_count(cluster_gpus) == expected


def test_fixed_worker_count_ignores_the_cluster():
    pool = parse_farm_config({"pools": [tiny_pool(workers=5, gpus_per_worker=0)], "state": "/s"}).pools[0]
    assert pool.gpus_per_worker == 0.0  # a CPU pool
    assert [pool.worker_count(g) for g in (0, 1, 64)] == [5, 5, 5]


def test_per_gpu_without_gpus_per_worker_is_refused_when_built_in_code():
    pool = PoolConfig(name="p", model={"backend": "tiny"}, workers="per_gpu", gpus_per_worker=0)
    with pytest.raises(ValueError, match="pool 'p'.*gpus_per_worker > 0"):
        pool.worker_count(4)


def test_pool_for_matches_a_validated_manifest(tmp_path):
    (tmp_path / "models" / "sd").mkdir(parents=True)
    config_path = tmp_path / "FARM.yaml"
    config_path.write_text(json.dumps({
        "pools": [
            {"name": "tiny", "model": {"backend": "tiny"}, "workers": 1},
            {"name": "sd", "model": {"backend": "diffusers", "path": "models/sd"}, "workers": "per_gpu"},
            {"name": "tiny16", "model": {"backend": "tiny", "dtype": "float16"}, "workers": 1},
        ],
        "state": "state",
    }))
    config = load_farm_config(str(config_path))
    assert config.pools[1].model == {"backend": "diffusers", "path": str(tmp_path / "models" / "sd")}

    job = {"prompt": "a cat", "seed": 1}
    tiny = validate_manifest({"model": {"backend": "tiny"}, "jobs": [job]})
    no_model = validate_manifest({"jobs": [job]})  # a manifest without a model gets the tiny one
    sixteen = validate_manifest({"model": {"backend": "tiny", "dtype": "float16"}, "jobs": [job]})
    assert config.pool_for(tiny.model).name == "tiny"
    assert config.pool_for(no_model.model).name == "tiny"
    assert config.pool_for(sixteen.model).name == "tiny16"
    assert config.pool_for({"backend": "tiny"}).name == "tiny"  # as written, not yet validated
    assert config.pool_for({}).name == "tiny"  # as written: validation fills in the tiny backend
    assert config.pool_for({"backend": "tiny", "dtype": None}).name == "tiny"  # "key:" with no value = absent

    # the same relative path, written in a manifest next to the config, names the same model
    manifest_path = tmp_path / "job.yaml"
    manifest_path.write_text(json.dumps({"model": {"backend": "diffusers", "path": "models/sd/"}, "jobs": [job]}))
    assert config.pool_for(load_manifest(str(manifest_path)).model).name == "sd"

    # another model, or one that is not a model at all: no pool
    elsewhere = validate_manifest({"model": {"backend": "diffusers", "path": "/other/sd"}, "jobs": [job]})
    assert config.pool_for(elsewhere.model) is None
    assert config.pool_for(validate_manifest({"model": {"backend": "tiny", "dtype": "bfloat16"},
                                              "jobs": [job]}).model) is None
    assert config.pool_for({"backend": "nope"}) is None
    assert config.pool("sd") is config.pools[1] and config.pool("missing") is None


def test_model_args_compare_by_content_not_key_order():
    config = parse_farm_config({"pools": [tiny_pool(model={"backend": "tiny", "args": {"a": 1, "b": [1, 2]}})],
                                "state": "/s"})
    assert config.pools[0].serves({"args": {"b": [1, 2], "a": 1}, "backend": "tiny"})
    assert not config.pools[0].serves({"backend": "tiny", "args": {"a": 2, "b": [1, 2]}})


def test_paths_are_made_absolute_against_the_config_dir(tmp_path, monkeypatch):
    data = {"pools": [tiny_pool(node_cache_dir="cache/{node}")], "state": "runs-state"}
    config = parse_farm_config(data, str(tmp_path))
    assert config.state == str(tmp_path / "runs-state")
    assert config.pools[0].node_cache_dir == str(tmp_path / "cache" / "{node}")
    monkeypatch.chdir(tmp_path / "..")  # without a base dir: against the working directory
    relative = parse_farm_config({**data, "pools": [tiny_pool(model={"backend": "diffusers", "path": "m/sd"})]})
    assert relative.state == os.path.abspath("runs-state")
    assert relative.pools[0].model["path"] == os.path.abspath("m/sd")
    # URLs are kept as written (a trailing / dropped)
    assert parse_farm_config({**data, "state": "memory://farm/state/"}, str(tmp_path)).state == "memory://farm/state"


def test_options_keep_only_what_the_pool_sets():
    config = parse_farm_config({"pools": [tiny_pool(options={"lora_mode": "lowrank", "max_batch": 8,
                                                             "fp8": None})], "state": "/s"})
    pool = config.pools[0]
    assert pool.options == {"lora_mode": "lowrank", "max_batch": 8}
    assert pool.farm_options() == FarmOptions(lora_mode="lowrank", max_batch=8)
    assert parse_farm_config({"pools": [tiny_pool()], "state": "/s"}).pools[0].farm_options() == FarmOptions()


def test_round_trips(tmp_path):
    data = {
        "pools": [
            tiny_pool(gpus_per_worker=0.5, adapter_cache_mb=512, node_cache_dir="/cache/{node}",
                      node_cache_mb=10_000, options={"lora_mode": "merge"}),
            {"name": "sd", "model": {"backend": "diffusers", "path": "/m/sd", "dtype": "bfloat16",
                                     "args": {"variant": "fp16"}}, "workers": "per_gpu"},
        ],
        "state": "memory://state",
        "submitters": {"alice": 1, "bob": 2.5},
        "fair_share": False,
        "storage_options": {"s3": {"key": "AKIA-SECRET", "endpoint_url": "http://127.0.0.1:9000"}},
    }
    config = parse_farm_config(data, str(tmp_path))
    assert config.fair_share is False
    assert parse_farm_config(config.to_dict()) == config
    assert parse_farm_config(json.loads(json.dumps(config.to_dict()))) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert config.storage_options["s3"]["key"] == "AKIA-SECRET"
    assert "AKIA-SECRET" not in repr(config)  # credentials stay out of logs
    path = tmp_path / "again.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_farm_config(str(path)) == config


def test_frozen():
    config = parse_farm_config({"pools": [tiny_pool()], "state": "/s"})
    with pytest.raises(AttributeError):
        config.state = "/elsewhere"  # type: ignore[misc]
    assert isinstance(config, FarmConfig) and isinstance(config.pools, tuple)


def test_load_reports_file_problems(tmp_path):
    with pytest.raises(FarmConfigError, match="cannot read"):
        load_farm_config(str(tmp_path / "missing.yaml"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("pools: [unclosed\n")
    with pytest.raises(FarmConfigError, match="invalid YAML"):
        load_farm_config(str(bad_yaml))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(FarmConfigError, match="empty farm config"):
        load_farm_config(str(empty))


def test_load_reports_duplicate_keys_with_the_rest(tmp_path):
    path = tmp_path / "FARM.yaml"
    path.write_text("pools:\n  - {name: a, model: {backend: tiny}, workers: 0}\nstate: /s\nstate: /t\n")
    with pytest.raises(FarmConfigError) as info:
        load_farm_config(str(path))
    assert any("duplicate key 'state'" in p for p in info.value.problems)
    assert any(p.startswith("pools[0].workers: must be >= 1") for p in info.value.problems)


def test_yaml_alias_bomb_is_bounded(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FarmConfigError, match="aliases expand past"):
        load_farm_config(str(path))


def test_the_example_farm_config_parses_and_points_at_the_demo_loras():
    import os

    from farm.service.config import load_farm_config

    examples = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples")
    c = load_farm_config(os.path.join(examples, "farms", "demo.yaml"))
    assert [p.name for p in c.pools] == ["tiny"] and c.pools[0].workers == 2
    assert c.lora_roots == (os.path.realpath(os.path.join(examples, "loras")),) or \
        c.lora_roots == (os.path.abspath(os.path.join(examples, "loras")),)
    assert c.state == os.path.abspath(os.path.join(examples, "..", "farm-state"))
