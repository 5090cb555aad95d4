"""A runtime low-rank branch: y = Wx + B(Ax). W is never touched; restore removes the hook.

Used for dense layers in ``lowrank`` mode and, as the side path, for nunchaku's
``AWQW4A16Linear`` (which has no low-rank branch of its own).
"""
from __future__ import annotations

import torch
from torch import nn

from .ledger import Ledger


class LowRankBranch:
    """The branch's state; swapping ``A``/``B`` switches compositions without new hooks."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A = A
        self.B = B

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        delta = nn.functional.linear(nn.functional.linear(x.to(self.A.dtype), self.A), self.B)
        return output + delta.to(output.dtype)


def attach(module: nn.Module, name: str, A: torch.Tensor, B: torch.Tensor, ledger: Ledger) -> LowRankBranch:
    """Hook a branch with ``A``/``B`` (already in the module's dtype and device) onto ``module``."""
    branch = LowRankBranch(A, B)
    handle = module.register_forward_hook(branch)
    ledger.record(name, handle.remove)
    return branch


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    for name in ("weight", "bias", "wscales", "proj_up"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype, t.device
    p = next(module.parameters())
    return p.dtype, p.device
