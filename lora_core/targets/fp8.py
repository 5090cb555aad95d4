"""Fuse, then quantize: weight-only fp8 (e4m3, per-output-channel scale) after LoRA merge.

Order matters for quantized runs: a LoRA merged into already-quantized weights would add
its delta to rounding error and round again. So each ``FP8Linear`` keeps its master copy
(the base weight in its original dtype) off-device; a composition is merged into the
master in fp32 and only the result is quantized. Quantize-then-LoRA is never done. The
ledger keeps the previous fp8 bytes and scales, so restore is exact by copy.
"""
from __future__ import annotations

import torch
from torch import nn

from ..compose import ModuleUpdate
from .dense import merged_weight
from .ledger import Ledger

E4M3_MAX = 448.0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 scale, then e4m3. Rows of zeros get scale 1."""
    wf = w.float()
    scale = wf.abs().amax(dim=1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (wf / scale).to(torch.float8_e4m3fn), scale


class FP8Linear(nn.Module):
    """A Linear whose weight lives as fp8 + scale; computes in the master dtype."""

    def __init__(self, linear: nn.Linear, master_device: str | torch.device = "cpu"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.master = linear.weight.detach().to(master_device, copy=True)  # never quantized
        q, s = quantize(linear.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.qweight.float() * self.scale).to(self.compute_dtype)
        return nn.functional.linear(x, w, self.bias)


def quantize_modules(root: nn.Module, names: list[str], master_device: str | torch.device = "cpu") -> int:
    """Replace the named nn.Linear modules by FP8Linear; returns the bytes saved on device."""
    saved = 0
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        lin = getattr(parent, leaf)
        q = FP8Linear(lin, master_device)
        saved += lin.weight.numel() * lin.weight.element_size() - q.qweight.numel() - q.scale.numel() * 4
        setattr(parent, leaf, q)  # ModuleList/Sequential accept setattr with a digit name
    return saved


def apply_fp8(module: FP8Linear, update: ModuleUpdate, ledger: Ledger) -> None:
    new = merged_weight(module.master, update)  # from the master, in fp32: never from fp8
    q, s = quantize(new)
    old_q, old_s = module.qweight.clone(), module.scale.clone()

    def undo(m=module, q=old_q, s=old_s) -> None:
        m.qweight.copy_(q)
        m.scale.copy_(s)

    module.qweight.copy_(q.to(module.qweight.device))
    module.scale.copy_(s.to(module.scale.device))
    ledger.record(update.module, undo)
