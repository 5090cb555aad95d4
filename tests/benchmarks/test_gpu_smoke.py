"""benchmarks/gpu.py on the CPU: the smoke preset runs every cell of the GPU benchmark (the
same code, wall clock instead of CUDA events) with its exactness checks, and writes the JSON
and the table; the budget skips cells and says so; the device fingerprint sees a changed byte.
No timing is asserted beyond "measured": finite and positive."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from benchmarks import compose_setup as S
from benchmarks import gpu
from benchmarks.gpu_budget import Watchdog

SWITCH_CELLS = {"merge": ("cold", "warm_switch", "restore"), "lowrank": ("new_composition", "warm_switch"),
                "svdq": ("new_composition", "warm_switch", "restore")}


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_the_smoke_run_measures_every_cell_and_passes_its_checks(tmp_path, monkeypatch, one_thread):
    calls = []

    def counting(device):  # the seam the CUDA-event timer takes on a GPU
        def timer(fn):
            calls.append(1)
            return S.wall_timer(fn)
        return timer

    monkeypatch.setattr(gpu, "timer_for", counting)
    prefix = str(tmp_path / "smoke")
    rc = gpu.main(["--preset", "smoke", "--device", "cpu", "--threads", "1", "--out", prefix])
    result = json.load(open(prefix + ".json"))
    table = open(prefix + ".md").read()
    assert rc == 0 and result["all_checks_ok"] and result["skipped"] == [] and "aborted" not in result
    s = result["settings"]
    expected = {f"{m}/{c}/r{r}x{n}" for m, cells in SWITCH_CELLS.items() for c in cells for r in s["ranks"]
                for n in s["sizes"]}
    assert set(result["scenarios"]) == expected
    for name, row in result["scenarios"].items():
        assert row["check"]["ok"], name
        assert positive(row["ours_s"]) and positive(row["peer_s"]), name
        assert row["floor_s"] is None and row["scenario"] == "restore" and row["mode"] == "svdq" or positive(row["floor_s"])
        assert row["blocks"] == s["blocks"] == result["switch_blocks"] == 2
    render = result["render"]
    got = {(r["variant"], r["rank"], r["loras"]) for r in render["rows"]}
    n = max(s["sizes"])
    assert got == {("base", 0, 0)} | {(v, r, n) for v in ("ours lowrank", "PEFT unfused") for r in s["ranks"]}
    assert all(positive(r["step_s"]) for r in render["rows"])
    assert render["tokens"] == {"image": (s["resolution"] // 16) ** 2, "text": s["txt_tokens"]}
    for c in render["checks"]:
        assert c["ok"] and c["base_bit_exact_after_restore"] and c["lora_effect_above_rounding"]
        assert c["worst_ours_vs_peft"] < 0.1
    samples = sum(len(r["ours_samples"]) + len(r["peer_samples"]) for r in result["scenarios"].values())
    assert len(calls) >= samples  # every cell's samples went through the timer seam
    assert "| merge warm switch | r4 x 1 |" in table and "| ours lowrank | r4 x 2 |" in table
    assert "All checks passed." in table and result["timer"] == "wall clock"


def test_an_exhausted_budget_skips_cells_and_says_why(tmp_path, one_thread):
    prefix = str(tmp_path / "none")
    rc = gpu.main(["--preset", "smoke", "--device", "cpu", "--threads", "1", "--budget-s", "0",
                   "--phases", "render", "svdq", "--out", prefix])
    result = json.load(open(prefix + ".json"))
    assert rc == 1 and not result["all_checks_ok"] and result["scenarios"] == {}
    cells = [s["cell"] for s in result["skipped"]]
    assert "render base" in cells and "svdq r4 files" in cells  # svdq alone writes its own LoRA files
    assert all(s["why"] for s in result["skipped"])
    assert "skipped render base: time budget" in open(prefix + ".md").read()


def test_the_watchdog_interrupts_an_overrunning_cell():
    dog = Watchdog(1.0, "late")
    with pytest.raises(KeyboardInterrupt):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
    assert dog.fired and dog.why == "late"
    quiet = Watchdog(1.0, "never")
    quiet.cancel()
    time.sleep(1.5)
    assert not quiet.fired


def test_the_device_fingerprint_sees_a_changed_or_moved_byte():
    w = (torch.randn(64, 48) * 0.02).to(torch.bfloat16)
    base = S._device_digest(w, chunk=1000)  # several chunks
    assert S._device_digest(w.clone(), chunk=1000) == base == S._device_digest(w)
    one = w.clone()
    one.view(-1).view(torch.int16)[777] ^= 1  # one bit of one element
    swapped = w.clone()
    swapped[3, 5], swapped[40, 1] = w[40, 1], w[3, 5]
    assert w[3, 5] != w[40, 1]
    assert S._device_digest(one, chunk=1000) != base and S._device_digest(swapped, chunk=1000) != base


def test_full_size_fits_an_h200_for_the_render_and_shrinks_for_the_dense_phase():
    """Qwen-Image's own config (60 blocks): one copy (render) fits in 139 GiB; three copies
    (ours, PEFT's, the merge's kept originals) and the LoRAs do not, so the dense phase shrinks."""
    blk, rest, shapes = gpu.block_bytes({})
    assert 60 * blk + rest == 2 * 20_430_401_088  # Qwen-Image's 20.4B parameters, bf16
    free = 139 << 30
    lora = 2 * 64 * sum(i + o for i, o in shapes.values())
    assert gpu.blocks_that_fit(free, blk + 12 * lora, rest, 60) == 60
    args = gpu.parse(["--preset", "full", "--device", "cpu"])
    dense = gpu.blocks_that_fit(free, 3 * blk + gpu.dense_files(args) * lora, 3 * rest, 60)
    assert 30 <= dense < 60
    assert gpu.blocks_that_fit(1 << 30, blk, rest, 60) == 1  # never zero blocks


def test_adapters_move_to_the_device_whole():
    import lora_core
    from testsupport import lora as T

    layers = T.random_layers({"transformer_blocks.0.attn.to_q": (8, 8)}, rank=2, alpha=1.0)
    a = lora_core.load_adapter(T.peft_state_dict(layers))
    moved = gpu.on_device(a, torch.device("meta"))
    layer = moved.layers["transformer_blocks.0.attn.to_q"]
    assert layer.A.is_meta and layer.B.is_meta and layer.alpha == 1.0
    assert moved.content_id == a.content_id and moved.source == a.source and moved.scheme == a.scheme
    assert gpu.on_device(a, torch.device("cpu")) is a
