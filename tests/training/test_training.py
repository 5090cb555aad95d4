"""`python -m training`: the script is reproducible from its seed, what it writes is what the
tiny backend and the LoRA loader read, and the committed weights are the files their checksums
name."""
from __future__ import annotations

import json
import os

import pytest
import torch

from training.run import QUICK, train_all, train_loras_only
from workers.backends import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the curve depends a little on the thread count; same count, same curve
    try:
        runs = []
        for i in range(2):
            d = tmp_path_factory.mktemp(f"run{i}")
            train_all(str(d / "weights"), str(d / "loras"), seed=0, sizes=QUICK, log=lambda _line: None)
            runs.append(d)
        d = tmp_path_factory.mktemp("other-seed")
        train_all(str(d / "weights"), str(d / "loras"), seed=1, sizes=QUICK, log=lambda _line: None)
        runs.append(d)
    finally:
        torch.set_num_threads(threads)
    return runs


def curves(d):
    doc = json.load(open(d / "weights" / "train_log.json"))
    return {s["name"]: [v for _step, v in s["curve"]] for s in doc["stages"]}


def test_same_seed_same_loss_curve_other_seed_another(two_runs):
    a, b, other = (curves(d) for d in two_runs)
    assert list(a) == ["vae", "transformer", "lora palette", "lora stripes", "lora snowman"]
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    assert any(a[n] != pytest.approx(other[n], rel=1e-3) for n in a), "the seed must matter"
    for part in ("weights", "loras"):  # and the same bytes: the checksums a rerun gives are the committed ones
        assert (two_runs[0] / part / "SHA256SUMS").read_text() == (two_runs[1] / part / "SHA256SUMS").read_text()


def test_the_lora_stage_alone_on_the_written_weights_makes_the_same_loras(two_runs, tmp_path):
    """`python -m training --loras-only` trains on the committed (fp16) weights what a whole run
    trained on the same weights in memory: the same bytes."""
    import shutil

    d = two_runs[0]
    weights = tmp_path / "weights"
    shutil.copytree(d / "weights", weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_loras_only(str(weights), str(tmp_path / "loras"), seed=0, sizes=QUICK, log=lambda _line: None)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "loras" / "SHA256SUMS").read_text() == (d / "loras" / "SHA256SUMS").read_text()
    tiny.check_sums(str(weights))  # meta.json rewritten, its checksum with it
    assert [s["name"] for s in json.load(open(weights / "train_log.json"))["stages"]] == list(curves(d))
    with pytest.raises(ValueError, match="trained from seed 0, not 1"):
        train_loras_only(str(weights), str(tmp_path / "other"), seed=1, sizes=QUICK, log=lambda _line: None)


def test_written_weights_load_into_the_tiny_backend_and_the_loras_bind(two_runs):
    from lora_core import ModelIndex, load_adapter, plan

    d = two_runs[0]
    tiny.check_sums(str(d / "weights"))
    tiny.check_sums(str(d / "loras"))
    pipe = tiny.build_trained_pipeline(directory=str(d / "weights"))
    state = json.load(open(d / "weights" / "meta.json"))["vae_config"]
    assert list(pipe.vae.config.latents_std) == state["latents_std"]
    index = ModelIndex(pipe.transformer)
    for name in ("palette", "stripes", "snowman"):
        adapter = load_adapter(str(d / "loras" / f"{name}.safetensors"))
        assert plan([(adapter, 1.0)], index), name  # every key binds (plan raises on what does not)


def test_a_changed_weight_file_is_refused_by_name(two_runs, tmp_path):
    import shutil

    d = tmp_path / "weights"
    shutil.copytree(two_runs[0] / "weights", d)
    with open(d / "vae.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(RuntimeError, match="vae.safetensors is not the file"):
        tiny.build_trained_pipeline(directory=str(d))


def test_committed_weights_and_loras_are_the_files_their_checksums_name():
    parts = tiny.check_sums(tiny.TRAINED_DIR)
    assert sorted(os.path.basename(p) for p in parts) == ["meta.json", "text_encoder.safetensors",
                                                          "transformer.safetensors", "vae.safetensors"]
    loras = tiny.check_sums(os.path.join(ROOT, "examples", "loras"))
    assert sorted(os.path.basename(p) for p in loras) == ["palette.safetensors", "snowman.safetensors",
                                                          "stripes.safetensors"]
    total = sum(os.path.getsize(p) for p in parts + loras)
    assert total < 8 * 2**20, f"committed weights are {total / 2**20:.1f} MiB"
