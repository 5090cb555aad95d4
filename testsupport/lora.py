"""Helpers for tests and benchmarks: LoRA files in every key scheme we read (the writers
are :mod:`lora_core.synthetic`'s, re-exported so one ``T`` serves a test), an fp64
reference merge, and CPU stand-ins for nunchaku's quantized layers with their real field
names and shapes.

The stand-ins carry ``qweight``/``wscales``/``smooth_factor``/``proj_down``/``proj_up``/
``rank`` (SVDQ) and ``qweight``/``wscales``/``wzeros`` (AWQ) with nunchaku's shapes and
dtypes, plus a dense fp32 copy of the main-branch weight for a reference forward:
SVDQ: y = x W^T + unpack(up)[:, :rank] (unpack(down)[:rank] x) + bias.
"""
from __future__ import annotations

import torch
from torch import nn

from lora_core.nunchaku import pack_lowrank, round_up, unpack_lowrank
from lora_core.synthetic import (Layer, kohya_state_dict, linear_shapes, peft_state_dict, random_layers,
                                 write_safetensors)


def reference_merge(w: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor, float, float]]) -> torch.Tensor:
    """Independent fp64 W + Σ s·(α/r)·B@A for (A, B, alpha, strength) terms."""
    out = w.double().clone()
    for a, b, alpha, s in terms:
        out += s * (alpha / a.shape[0]) * (b.double() @ a.double())
    return out


class SVDQW4A4Linear(nn.Module):
    """CPU stand-in for nunchaku's SVDQW4A4Linear (same fields, shapes, dtypes)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 32, bias: bool = True,
                 torch_dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.precision, self.group_size = "int4", 64
        self.qweight = nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.int8), requires_grad=False)
        self.wscales = nn.Parameter(torch.ones(max(in_features // 64, 1), out_features, dtype=torch_dtype), requires_grad=False)
        self.smooth_factor = nn.Parameter(torch.ones(in_features, dtype=torch_dtype), requires_grad=False)
        self.smooth_factor_orig = nn.Parameter(torch.ones(in_features, dtype=torch_dtype), requires_grad=False)
        self.bias = nn.Parameter((torch.randn(out_features, generator=g) * 0.1).to(torch_dtype)) if bias else None
        down = (torch.randn(rank, in_features, generator=g) * 0.05).to(torch_dtype)
        up = (torch.randn(out_features, rank, generator=g) * 0.05).to(torch_dtype)
        self.proj_down = nn.Parameter(pack_lowrank(down, down=True), requires_grad=False)
        self.proj_up = nn.Parameter(pack_lowrank(up, down=False), requires_grad=False)
        # the main branch's effective weight, dense, for the reference forward only
        self.register_buffer("dense_ref", torch.randn(out_features, in_features, generator=g) * 0.05)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        down = unpack_lowrank(self.proj_down.data, down=True)[: self.rank, : self.in_features]
        up = unpack_lowrank(self.proj_up.data, down=False)[: self.out_features, : self.rank]
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.lowrank_factors()
        xf = x.float()
        y = xf @ self.dense_ref.T + (xf @ down.float().T) @ up.float().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class AWQW4A16Linear(nn.Module):
    """CPU stand-in for nunchaku's AWQW4A16Linear (same fields, shapes, dtypes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64,
                 torch_dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.qweight = nn.Parameter(torch.zeros(out_features // 4, in_features // 2, dtype=torch.int32), requires_grad=False)
        self.wscales = nn.Parameter(torch.ones(max(in_features // group_size, 1), out_features, dtype=torch_dtype), requires_grad=False)
        self.wzeros = nn.Parameter(torch.zeros(max(in_features // group_size, 1), out_features, dtype=torch_dtype), requires_grad=False)
        self.bias = nn.Parameter((torch.randn(out_features, generator=g) * 0.1).to(torch_dtype)) if bias else None
        self.register_buffer("dense_ref", torch.randn(out_features, in_features, generator=g) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() @ self.dense_ref.T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def nunchaku_qwen_standin(dim: int = 64, mlp: int = 128, layers: int = 1, rank: int = 32,
                          dtype: torch.dtype = torch.bfloat16, modulation: bool = True,
                          reference: bool = True) -> nn.Module:
    """Module tree with nunchaku Qwen-Image's names: fused to_qkv / add_qkv_proj (SVDQ),
    to_out.0, to_add_out, img_mlp/txt_mlp net.0.proj and net.2 (SVDQ), img_mod.1 / txt_mod.1 (AWQ;
    ``modulation=False`` leaves them out). ``reference=False`` drops the SVDQ layers' dense
    fp32 reference weights (their forward then needs them: for switch-only benchmarks at
    real width, where they would cost GBs)."""

    def svdq(i, o, seed):
        m = SVDQW4A4Linear(i, o, rank=rank, torch_dtype=dtype, seed=seed)
        if not reference:
            m.dense_ref = torch.empty(0)
        return m

    root = nn.Module()
    root.transformer_blocks = nn.ModuleList()
    for li in range(layers):
        s = 100 * li
        blk = nn.Module()
        blk.attn = nn.Module()
        blk.attn.to_qkv = svdq(dim, 3 * dim, s + 1)
        blk.attn.add_qkv_proj = svdq(dim, 3 * dim, s + 2)
        blk.attn.to_out = nn.ModuleList([svdq(dim, dim, s + 3)])
        blk.attn.to_add_out = svdq(dim, dim, s + 4)
        for j, stream in enumerate(("img", "txt")):
            ff = nn.Module()
            ff.net = nn.ModuleList([nn.Module(), nn.GELU(), svdq(mlp, dim, s + 10 + j)])
            ff.net[0].proj = svdq(dim, mlp, s + 20 + j)
            setattr(blk, f"{stream}_mlp", ff)
            if modulation:
                setattr(blk, f"{stream}_mod",
                        nn.Sequential(nn.SiLU(), AWQW4A16Linear(dim, 6 * dim, torch_dtype=dtype, seed=s + 30 + j)))
        root.transformer_blocks.append(blk)
    return root


__all__ = [
    "Layer", "linear_shapes", "random_layers", "peft_state_dict", "kohya_state_dict", "write_safetensors",
    "reference_merge", "SVDQW4A4Linear", "AWQW4A16Linear", "round_up",
    "nunchaku_qwen_standin",
]
