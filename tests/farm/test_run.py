"""The farm end to end on a real local Ray cluster with the real tiny model."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from farm import runner
from farm.cli import main as farm_main
from jobs.manifest import load_manifest
from jobs.results import read_results
from testsupport import lora as T

MODEL_SHAPES = None


def tiny_shapes(include):
    import torch
    from diffusers import QwenImageTransformer2DModel

    from workers.backends.tiny import TINY_TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    return T.linear_shapes(model, include)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    out = {}
    for name, include, seed in [("a", ("attn.to_q",), 1), ("b", ("img_mlp",), 2)]:
        layers = T.random_layers(tiny_shapes(include), rank=4, seed=seed, scale=0.5)
        out[name] = T.write_safetensors(d / f"{name}.safetensors", T.peft_state_dict(layers))
    junk = d / "junk.safetensors"
    junk.write_bytes(b"this is not a LoRA" * 20)
    out["junk"] = str(junk)
    return out


def write_manifest(path, loras, jobs_loras, prompts=("a cat", "a dog")):
    jobs = []
    for i, ls in enumerate(jobs_loras):
        for p in prompts:
            jobs.append({"id": f"j{i}-{p.split()[-1]}", "prompt": p, "seed": i,
                         "loras": [{"uri": loras[n], "strength": s} for n, s in ls]})
    data = {"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
            "output": str(path.parent / "out"), "jobs": jobs}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_run_then_resubmit_renders_nothing(ray_cluster, tmp_path, loras):
    path = write_manifest(tmp_path / "m.yaml", loras, [[], [("a", 1.0)], [("a", 0.5), ("b", 1.0)]])
    m = load_manifest(path)
    s = runner.run_manifest(m, workers=2, progress=False)
    assert (s.ok, s.failed, s.exit_code) == (6, 0, 0)
    rows = read_results(m.output)
    assert sorted(r.job_id for r in rows) == sorted(j.job_id for j in m.jobs)
    assert all(r.status == "ok" and os.path.exists(r.output_uri) for r in rows)
    assert len({r.composition_key for r in rows}) == 3
    assert {r.lora_mode for r in rows} <= {"merge", "lowrank"} and all(r.lora_mode for r in rows), "the mode is recorded"
    assert s.switches <= 4, "3 compositions on 2 workers: at most one extra switch"
    again = runner.run_manifest(m, workers=2, progress=False)
    assert (again.ok, again.failed, again.skipped) == (0, 0, 6)


def test_bad_lora_fails_alone(ray_cluster, tmp_path, loras):
    path = write_manifest(tmp_path / "m.yaml", loras, [[("a", 1.0)], [("junk", 1.0)]])
    m = load_manifest(path)
    s = runner.run_manifest(m, workers=2, progress=False)
    assert (s.ok, s.failed, s.exit_code) == (2, 2, 1)
    bad = [r for r in read_results(m.output) if r.status == "failed"]
    assert {r.job_id for r in bad} == {"j1-cat", "j1-dog"}
    assert all("CorruptFileError" in r.error and "junk.safetensors" in r.error for r in bad)
    assert all(r.attempts == 1 for r in bad), "a bad LoRA is not retried"
    assert not any(os.path.exists(os.path.join(m.output, "images", f"{j}.png")) for j in ("j1-cat", "j1-dog"))


def test_invalid_manifest_exit_2_nothing_rendered(tmp_path, capsys):
    out = tmp_path / "out"
    bad = {"model": {"backend": "tiny"}, "output": str(out), "jobs": [
        {"prompt": "x", "colour": "red"}, {"prompt": "y", "steps": -1}, {"seed": 1},
        {"prompt": "z", "loras": [{"uri": "a.safetensors", "strength": "high"}]}]}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    assert farm_main(["validate", str(p)]) == 2
    assert farm_main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    for needle in ("jobs[0]", "colour", "jobs[1].steps", "jobs[2].prompt", "jobs[3].loras[0].strength"):
        assert needle in err
    assert not out.exists()


def test_interrupted_run_then_rerun_finishes_only_the_rest(ray_cluster, tmp_path, loras, monkeypatch):
    path = write_manifest(tmp_path / "m.yaml", loras, [[], [("a", 1.0)], [("b", 1.0)]])
    m = load_manifest(path)

    class Interrupt:  # Ctrl-C after the third finished job
        def __init__(self, total, enabled):
            pass

        def __call__(self, d):
            if d.stats.ok >= 3:
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(runner, "_Progress", Interrupt)
    first = runner.run_manifest(m, workers=1, progress=False, capacity=1)
    assert first.interrupted and first.exit_code == 130
    kept = {r.job_id for r in read_results(m.output) if r.status == "ok"}
    assert len(kept) >= 3
    monkeypatch.undo()
    second = runner.run_manifest(m, workers=2, progress=False)
    assert second.skipped == len(kept) and second.ok == 6 - len(kept) and second.failed == 0


def test_a_run_into_an_output_root_starts_from_its_measured_costs(ray_cluster, tmp_path, loras, monkeypatch):
    """The first run learns from 1 s priors; a later run into the same output root (more
    jobs) starts from what the first one measured: its scheduler's first plan is made from
    measured seconds."""
    import farm.scheduler.costs as costs

    seen = []
    real = costs.costs_from_rows

    def watch(rows, jobs, **kw):
        seen.append(real(rows, jobs, **kw))
        return seen[-1]

    monkeypatch.setattr(costs, "costs_from_rows", watch)
    m = load_manifest(write_manifest(tmp_path / "m.yaml", loras, [[("a", 1.0)], [("b", 1.0)]]))
    assert runner.run_manifest(m, workers=2, progress=False).ok == 4
    assert seen == [None], "nothing measured yet: the 1 s priors"
    first = [r for r in read_results(m.output) if r.status == "ok"]
    more = load_manifest(write_manifest(tmp_path / "m.yaml", loras, [[("a", 1.0)], [("b", 1.0)]],
                                        prompts=("a bird", "a fish")))
    s = runner.run_manifest(more, workers=2, progress=False)
    assert (s.ok, s.skipped) == (4, 0)
    p = seen[-1]
    # an EWMA of the first run's measurements (same image size): within their range, not the 1 s prior
    composes = [r.compose_s for r in first if r.compose_s > 0]
    renders = [r.render_s for r in first if r.render_s > 0]
    assert composes and min(composes) - 1e-9 <= p.compose_s <= max(composes) + 1e-9
    assert min(renders) - 1e-9 <= p.render_s <= max(renders) + 1e-9
    assert p.render_s < 1.0 and p.compose_s < 1.0, "the tiny model renders 64 px in well under a second"


def test_a_rerun_records_images_whose_rows_died_with_the_driver(ray_cluster, tmp_path, loras):
    """A driver killed before its buffered rows reached a part leaves images without rows: the
    rerun reads each one's stamp and records it (nothing rendered), except an image whose
    stamp names another picture, which is rendered again. One row per job in the end."""
    import dataclasses
    import io
    import shutil

    from PIL import Image

    from jobs.stamp import RECOVERED, stamp_png

    local = {"a": shutil.copy(loras["a"], str(tmp_path / "a.safetensors"))}  # under the manifest's dir (the URI policy)
    m = load_manifest(write_manifest(tmp_path / "m.yaml", local, [[], [("a", 1.0)]]))
    assert runner.run_manifest(m, workers=1, progress=False).ok == 4
    first = {r.job_id: r for r in read_results(m.output)}
    shutil.rmtree(os.path.join(m.output, "results.parts"), ignore_errors=True)  # the rows died with the driver
    os.remove(os.path.join(m.output, "results.parquet"))
    wrong = m.jobs[0]  # its image now carries the stamp of another prompt under the same id
    buf = io.BytesIO()
    Image.open(first[wrong.job_id].output_uri).save(buf, format="PNG")
    with open(first[wrong.job_id].output_uri, "wb") as f:
        f.write(stamp_png(buf.getvalue(), dataclasses.replace(wrong, prompt="a bird"), m.model))
    kept = {j: (os.stat(r.output_uri).st_mtime_ns, open(r.output_uri, "rb").read())
            for j, r in first.items() if j != wrong.job_id}

    again = runner.run_manifest(m, workers=1, progress=False)
    assert (again.ok, again.failed, again.skipped, again.recovered, again.exit_code) == (1, 0, 3, 3, 0), \
        "one render: the image that is not its job's"
    rows = {r.job_id: r for r in read_results(m.output)}
    assert sorted(rows) == sorted(first) and all(r.status == "ok" for r in rows.values())
    assert rows[wrong.job_id].worker_id != RECOVERED
    for j, (mtime, data) in kept.items():
        assert rows[j].worker_id == RECOVERED and rows[j].composition_key == first[j].composition_key
        assert os.stat(rows[j].output_uri).st_mtime_ns == mtime and open(rows[j].output_uri, "rb").read() == data
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(os.path.join(m.output, "results.parquet")).column("job_id").to_pylist()) == sorted(first)
