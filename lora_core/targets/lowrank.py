"""A runtime low-rank branch: y = Wx + B(Ax). W is never touched; restore removes the hook.

Used for dense layers in ``lowrank`` mode and, as the side path, for nunchaku's
``AWQW4A16Linear`` (which has no low-rank branch of its own).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .ledger import Ledger


class BranchClock:
    """Seconds the branches spend on their own work (what the low-rank mode costs per
    forward). CPU: wall clock around each branch; CUDA: events, read once at ``take()``."""

    def __init__(self) -> None:
        self._cpu = 0.0
        self._events: list = []

    def start(self, device: torch.device):
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token) -> None:
        if isinstance(token, float):
            self._cpu += time.perf_counter() - token
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((token, end))

    def take(self) -> float:
        """Seconds since the last ``take`` (synchronizes CUDA events first)."""
        s = self._cpu
        if self._events:
            self._events[-1][1].synchronize()
            s += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        self._cpu, self._events = 0.0, []
        return s


class LowRankBranch:
    """The branch's state; swapping ``A``/``B`` switches compositions without new hooks."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, clock: BranchClock | None = None):
        self.A = A
        self.B = B
        self.clock = clock

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        token = self.clock.start(self.A.device) if self.clock is not None else None
        x = args[0]
        delta = nn.functional.linear(nn.functional.linear(x.to(self.A.dtype), self.A), self.B)
        out = output + delta.to(output.dtype)
        if token is not None:
            self.clock.stop(token)
        return out


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
