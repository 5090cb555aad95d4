"""``lora_core.switch``: composition to composition without a restore pass, exact both ways.

X and Y overlap on some modules (kept: rewritten from the kept original) and differ on
others (restored / newly merged). Every result is compared with the same composition
applied to a fresh base model, bit for bit, and with an independent fp64 merge.
"""
from __future__ import annotations

import pytest
import torch

import lora_core
from testsupport import lora as T
from lora_core.errors import NonFiniteError
from lora_core.model_index import ModelIndex
from lora_core.targets import dense
from lora_core.targets.budget import BudgetState

from .conftest import assert_same, snapshot
from .test_merge import check_merged, expected

MB = 1 << 20


def _adapters(model, tmp_path):
    """X on attention + img_mlp, Y on attention + txt_mlp: attention is shared."""
    lx = T.random_layers(T.linear_shapes(model, ("attn.", "img_mlp")), rank=4, seed=1)
    ly = T.random_layers(T.linear_shapes(model, ("attn.", "txt_mlp")), rank=6, seed=2)
    px = T.write_safetensors(tmp_path / "x.safetensors", T.peft_state_dict(lx))
    py = T.write_safetensors(tmp_path / "y.safetensors", T.peft_state_dict(ly))
    return (lx, lora_core.load_adapter(px)), (ly, lora_core.load_adapter(py))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _y_on_a_fresh_base(qwen, tmp_path):
    """(X adapter, Y adapter, Y's updates, the weights Y gives on the base, the base, the index)."""
    (_, ax), (_, ay) = _adapters(qwen, tmp_path)
    base = snapshot(qwen)
    index = ModelIndex(qwen)
    uy = lora_core.plan([(ay, 0.7)], index)
    h = lora_core.apply_updates(index, uy, "merge")
    want_y = _weights(qwen)
    h.restore()
    assert_same(qwen, base)
    return ax, ay, uy, want_y, base, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switch_x_to_y_equals_y_on_a_fresh_base(qwen, tmp_path, dtype):
    qwen.to(dtype)
    ax, ay, uy, want_y, base, index = _y_on_a_fresh_base(qwen, tmp_path)
    hx = lora_core.switch(index, None, lora_core.plan([(ax, 0.8)], index), "merge")
    shared = set(hx.merged) & set(uy)
    assert shared and set(hx.merged) - set(uy) and set(uy) - set(hx.merged), "the test needs all three kinds"
    hy = lora_core.switch(index, hx, uy, "merge")
    assert_same(qwen, want_y)  # kept modules rewritten from the original = a fresh merge, bit for bit
    assert set(hy.originals) == set(uy), "one original per merged module, none left from X"
    assert lora_core.switch(index, hy, {}, "merge") is None
    assert_same(qwen, base)
    assert not hy.originals


def test_switch_matches_fp64_reference(qwen, tmp_path):
    (lx, ax), (ly, ay) = _adapters(qwen, tmp_path)
    want = expected(qwen, [(ly, 0.7), (lx, 0.5)])
    index = ModelIndex(qwen)
    h = lora_core.switch(index, None, lora_core.plan([(ax, 0.8)], index), "merge")
    h = lora_core.switch(index, h, lora_core.plan([(ay, 0.7), (ax, 0.5)], index), "merge")
    check_merged(qwen, want)


@pytest.mark.parametrize("bad_module", ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.txt_mlp.net.2"])
def test_failed_switch_leaves_x_exactly_and_old_handle_valid(qwen, tmp_path, bad_module):
    """A NaN on a kept module (rewritten in place) or on a newly merged one: X is back."""
    (lx, ax), (ly, ay) = _adapters(qwen, tmp_path)
    base = snapshot(qwen)
    index = ModelIndex(qwen)
    hx = lora_core.switch(index, None, lora_core.plan([(ax, 0.8)], index), "merge")
    at_x = _weights(qwen)
    uy = lora_core.plan([(ay, 0.7)], index)
    u = uy[bad_module]
    big = torch.full_like(u.B, 3e38)  # finite factors whose product overflows
    uy[bad_module] = type(u)(u.module, u.kind, torch.ones_like(u.A), big)
    with pytest.raises(NonFiniteError, match=bad_module.replace(".", r"\.")):
        lora_core.switch(index, hx, uy, "merge")
    assert_same(qwen, at_x)
    assert hx.active
    hx.restore()
    assert_same(qwen, base)
    assert not hx.originals


def test_lowrank_switch_swaps_tensors_on_one_hook(qwen, tmp_path):
    (lx, ax), (ly, ay) = _adapters(qwen, tmp_path)
    base = snapshot(qwen)
    index = ModelIndex(qwen)
    mod = qwen.get_submodule("transformer_blocks.0.attn.to_q")
    inp = torch.randn(3, mod.in_features)
    uy = lora_core.plan([(ay, 0.7)], index)
    hy = lora_core.apply_updates(index, uy, "lowrank")
    want = mod(inp)
    hy.restore()
    hx = lora_core.switch(index, None, lora_core.plan([(ax, 0.8)], index), "lowrank")
    branch = hx.branches["transformer_blocks.0.attn.to_q"]
    hy = lora_core.switch(index, hx, uy, "lowrank")
    assert hy.branches["transformer_blocks.0.attn.to_q"] is branch, "the hook stays; its tensors change"
    assert len(mod._forward_hooks) == 1
    assert torch.equal(mod(inp), want)
    assert not any(m._forward_hooks for n, m in qwen.named_modules() if "img_mlp" in n), "X-only branches removed"
    lora_core.switch(index, hy, {}, "lowrank")
    assert_same(qwen, base)


@pytest.mark.parametrize("strategy", ["keep_until_full", "rotate"])
@pytest.mark.parametrize("free_mb", [1000, 0])
def test_budgeted_switch_is_exact(qwen, tmp_path, strategy, free_mb):
    ax, ay, uy, want_y, base, index = _y_on_a_fresh_base(qwen, tmp_path)
    budget = BudgetState(reserve_bytes=10 * MB, strategy=strategy, free_bytes=lambda device: free_mb * MB)
    hx = lora_core.switch(index, None, lora_core.plan([(ax, 0.8)], index), "merge", budget=budget)
    hy = lora_core.switch(index, hx, uy, "merge", budget=budget)
    assert_same(qwen, want_y)
    assert set(budget.backups) == set(uy)
    lora_core.switch(index, hy, {}, "merge", budget=budget)
    assert_same(qwen, base)
    assert not budget.backups


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_merge_rows_in_blocks_matches_fp64(rows):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 29, generator=g).bfloat16()
    a, b = torch.randn(7, 29, generator=g), torch.randn(37, 7, generator=g)
    from lora_core.compose import ModuleUpdate

    dst = torch.empty_like(w)
    dense.merge_rows(dst, w, ModuleUpdate("m", "linear", a, b), rows=rows)
    ref = (w.double() + b.double() @ a.double()).bfloat16()
    diff = (dst.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)
    assert float(diff.max()) <= 2 ** -7, "within one bf16 ulp of the fp64 merge"
