"""ComfyUI as a peer for full-weight diffs, its documented semantics reproduced independently.

From ComfyUI's public code (facts, not code): ``comfy/lora.py`` turns ``X.diff`` into a
``("diff", (tensor,))`` patch on ``X.weight`` and ``X.diff_b`` into one on ``X.bias``;
``calculate_weight`` adds ``strength * diff`` (the diff cast to the intermediate dtype,
fp32) to the weight, itself copied to fp32 first (``patch_weight_to_device``), and the sum
is rounded back to the parameter's dtype once (round to nearest for bf16/fp16). No alpha,
no rank scale. On a bf16 diffusers model a parameter that only a diff touches must therefore
come out bit-identical to ComfyUI's value, in merge and in low-rank mode (where the diffs
are merged and the pairs are branches: ``lowrank+merge``); a weight that also has a LoRA is
checked against fp64 to within its one rounding.
"""
from __future__ import annotations

import pytest
import torch

import lora_core
from lora_core.api import mode_label
from testsupport import lora as T

from .conftest import assert_same, snapshot

B0 = "transformer_blocks.0"
S = 0.6


def comfy_value(w: torch.Tensor, diff: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI's patched value: fp32 copy of w, += strength * diff in fp32, cast back."""
    out = w.to(torch.float32, copy=True)
    out += strength * diff.to(torch.float32)
    return out.to(w.dtype)


@pytest.fixture
def qwen_bf16(qwen):
    return qwen.to(torch.bfloat16)


def _file(model, tmp_path):
    g = torch.Generator().manual_seed(21)
    mods = dict(model.named_modules())
    k = mods[f"{B0}.attn.to_k"]
    up = (torch.randn(k.out_features, 4, generator=g) * 0.3).half()
    down = (torch.randn(4, k.in_features, generator=g) * 0.3).half()
    diffs = {
        f"{B0}.attn.norm_q.diff": torch.randn(mods[f"{B0}.attn.norm_q"].weight.shape, generator=g) * 0.1,
        f"{B0}.attn.to_q.diff_b": torch.randn(k.out_features, generator=g) * 0.1,
        f"{B0}.attn.to_v.diff": torch.randn(k.weight.shape, generator=g) * 0.02,
        f"{B0}.attn.to_k.diff": torch.randn(k.weight.shape, generator=g) * 0.02,  # beside its LoRA pair
        "proj_out.diff_b": torch.randn(mods["proj_out"].bias.shape, generator=g) * 0.1,
    }
    sd = {f"diffusion_model.{n}": t.half() for n, t in diffs.items()}
    sd[f"diffusion_model.{B0}.attn.to_k.lora_up.weight"] = up
    sd[f"diffusion_model.{B0}.attn.to_k.lora_down.weight"] = down
    return T.write_safetensors(tmp_path / "comfy.safetensors", sd), sd


PARAM = {"diff": "weight", "diff_b": "bias"}


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_diff_only_parameters_are_bit_identical_to_comfyui(qwen_bf16, tmp_path, mode):
    path, sd = _file(qwen_bf16, tmp_path)
    before = snapshot(qwen_bf16)
    h = lora_core.apply(qwen_bf16, [(path, S)], mode=mode)
    now = qwen_bf16.state_dict()
    checked = 0
    for key, diff in sd.items():
        stem, _, suffix = key[len("diffusion_model."):].rpartition(".")
        if suffix not in PARAM or (stem == f"{B0}.attn.to_k" and mode == "merge"):
            continue  # LoRA factors; a weight merged together with its LoRA is checked below
        name = f"{stem}.{PARAM[suffix]}"
        assert torch.equal(now[name], comfy_value(before[name], diff, S)), name
        checked += 1
    assert checked == (5 if mode == "lowrank" else 4)
    assert mode_label(h.updates, mode) == ("lowrank+merge" if mode == "lowrank" else "merge")
    h.restore()
    assert_same(qwen_bf16, before)


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_weight_with_lora_and_diff_matches_fp64_within_one_rounding(qwen_bf16, tmp_path, mode):
    path, sd = _file(qwen_bf16, tmp_path)
    p = f"diffusion_model.{B0}.attn.to_k"
    mod = qwen_bf16.get_submodule(f"{B0}.attn.to_k")
    w0, b0 = mod.weight.detach().double().clone(), mod.bias.detach().double().clone()
    lora = sd[f"{p}.lora_up.weight"].double() @ sd[f"{p}.lora_down.weight"].double()  # alpha = rank
    ref = w0 + S * lora + S * sd[f"{p}.diff"].double()
    x = torch.randn(3, mod.in_features, dtype=torch.bfloat16)
    h = lora_core.apply(qwen_bf16, [(path, S)], mode=mode)
    if mode == "merge":
        got = mod.weight.double()
        assert ((got - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-30).all()  # one bf16 rounding of the exact sum
    else:
        assert torch.equal(mod.weight, comfy_value(w0.to(torch.bfloat16), sd[f"{p}.diff"], S))
        y64 = x.double() @ ref.T + b0
        assert torch.allclose(mod(x).double(), y64, atol=0.05, rtol=0.02)  # a bf16 forward
    h.restore()
