"""Helpers for tests, benchmarks and the demo: LoRA files in every key scheme we read,
and CPU stand-ins for nunchaku's quantized layers with their real field names and shapes.

The stand-ins carry ``qweight``/``wscales``/``smooth_factor``/``proj_down``/``proj_up``/
``rank`` (SVDQ) and ``qweight``/``wscales``/``wzeros`` (AWQ) with nunchaku's shapes and
dtypes, plus a dense fp32 copy of the main-branch weight for a reference forward:
SVDQ: y = x W^T + unpack(up)[:, :rank] (unpack(down)[:rank] x) + bias.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .nunchaku import pack_lowrank, round_up, unpack_lowrank

Layer = tuple[torch.Tensor, torch.Tensor, float]  # (A (r,in), B (out,r), alpha)


def linear_shapes(module: nn.Module, include: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """{name: (in, out)} of the nn.Linear layers whose name contains any of ``include``."""
    return {
        n: (m.in_features, m.out_features)
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and (not include or any(s in n for s in include))
    }


def random_layers(shapes: Mapping[str, tuple[int, int]], rank: int = 4, seed: int = 0, alpha: float | None = None,
                  scale: float = 0.05, dtype: torch.dtype = torch.float32) -> dict[str, Layer]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n_in, n_out) in sorted(shapes.items()):
        a = (torch.randn(rank, n_in, generator=g) * scale).to(dtype)
        b = (torch.randn(n_out, rank, generator=g) * scale).to(dtype)
        out[name] = (a, b, float(alpha if alpha is not None else rank))
    return out


def peft_state_dict(layers: Mapping[str, Layer], prefix: str = "transformer.", adapter: str | None = None,
                    with_alpha: bool = True) -> dict[str, torch.Tensor]:
    mid = f".{adapter}" if adapter else ""
    sd = {}
    for name, (a, b, alpha) in layers.items():
        sd[f"{prefix}{name}.lora_A{mid}.weight"] = a.contiguous()
        sd[f"{prefix}{name}.lora_B{mid}.weight"] = b.contiguous()
        if with_alpha:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return sd


def kohya_state_dict(layers: Mapping[str, Layer], prefix: str = "lora_unet_", underscored: bool = True) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (a, b, alpha) in layers.items():
        stem = prefix + (name.replace(".", "_") if underscored else name)
        sd[f"{stem}.lora_down.weight"] = a.contiguous()
        sd[f"{stem}.lora_up.weight"] = b.contiguous()
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def write_safetensors(path: str | os.PathLike, sd: Mapping[str, torch.Tensor], metadata: dict | None = None) -> str:
    path = os.fspath(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


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


__all__ = [
    "linear_shapes", "random_layers", "peft_state_dict", "kohya_state_dict", "write_safetensors",
    "reference_merge", "SVDQW4A4Linear", "AWQW4A16Linear", "round_up",
]


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
