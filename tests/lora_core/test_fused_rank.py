"""A fused file layer split across modules keeps per module only its own rank slice.

musubi-tuner's ``convert_z_image_lora_to_comfy.py`` writes Z-Image q/k/v as one
``attention.qkv`` layer: down (3r, in) = the three downs stacked, up (3·out, 3r)
block-diagonal, alpha·3 (so each component keeps alpha/r). Bound onto diffusers'
separate ``to_q``/``to_k``/``to_v``, each module's rows of the up are zero outside its own r
columns: the branch (or merge product) for each must be of rank r, not 3r, and give exactly
what the three separate layers give.
"""
from __future__ import annotations

import pytest
import torch

import lora_core
from lora_core.compose import own_rank
from lora_core.model_index import ModelIndex
from testsupport import lora as T

from .conftest import assert_same, snapshot
from .test_diff_families import zimage  # noqa: F401 - the fixture

R, ALPHA, S = 4, 2.0, 0.8
QKV = tuple(f"layers.0.attention.to_{c}" for c in "qkv")


def fused_and_separate(model):
    mods = dict(model.named_modules())
    layers = T.random_layers({n: (mods[n].in_features, mods[n].out_features) for n in QKV}, rank=R, seed=4,
                             alpha=ALPHA, dtype=torch.bfloat16)
    parts = [layers[n] for n in QKV]
    stem = "lora_unet_layers_0_attention_qkv"
    fused = {f"{stem}.lora_down.weight": torch.cat([a for a, _, _ in parts], 0),
             f"{stem}.lora_up.weight": torch.block_diag(*[b for _, b, _ in parts]),
             f"{stem}.alpha": torch.tensor(ALPHA * 3, dtype=torch.bfloat16)}
    separate = {k: v.to(torch.bfloat16) for k, v in T.kohya_state_dict(layers).items()}
    return layers, fused, separate


def test_plan_keeps_rank_r_per_component(zimage):  # noqa: F811
    _, fused, _ = fused_and_separate(zimage)
    updates = lora_core.plan([(lora_core.load_adapter(fused), S)], ModelIndex(zimage))
    assert set(updates) == set(QKV)
    assert all(u.rank == R for u in updates.values()), {n: u.rank for n, u in updates.items()}  # old main: 3r


@pytest.mark.parametrize("mode", ["lowrank", "merge"])
def test_fused_file_gives_exactly_what_the_separate_layers_give(zimage, mode):  # noqa: F811
    layers, fused, separate = fused_and_separate(zimage)
    mods = dict(zimage.named_modules())
    x = torch.randn(3, 5, 32)
    before = snapshot(zimage)
    h = lora_core.apply(zimage, [(separate, S)], mode=mode)
    want = {n: mods[n](x) for n in QKV}
    h.restore()
    h = lora_core.apply(zimage, [(fused, S)], mode=mode)
    if mode == "lowrank":
        assert {n: tuple(b.A.shape) for n, b in h.branches.items()} == {n: (R, 32) for n in QKV}
    for n in QKV:
        got = mods[n](x)
        assert torch.equal(got, want[n]), n  # the same tensors, so the same bits
        a, b, alpha = layers[n]
        ref = x.double() @ (before[f"{n}.weight"].double() + S * (alpha / R) * b.double() @ a.double()).T
        assert torch.allclose(got.double(), ref, atol=1e-5), n
    h.restore()
    assert_same(zimage, before)


def test_own_rank_drops_only_all_zero_columns():
    a = torch.arange(12.0).reshape(4, 3)
    b = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0]])
    a2, b2 = own_rank(a, b)
    assert torch.equal(a2, a[[1, 3]]) and torch.equal(b2, b[:, [1, 3]])
    assert torch.equal(b2 @ a2, b @ a)
    dense = torch.ones(2, 4)
    assert own_rank(a, dense)[0] is a  # nothing to drop: the same tensors, no copy
    meta = torch.empty(2, 4, device="meta")
    assert own_rank(a, meta)[1] is meta  # a header-only bind has no values to look at
