"""Merging under a memory budget: keep ``reserve_bytes`` free on the weights' device.

A dense merge needs scratch memory (an fp32 copy of W and the B@A product) and, for exact
restore, a copy of the original W. Under a budget:

- the merge math runs on the weight's device while that leaves ``reserve_bytes`` free,
  else it falls back to the CPU (slower, but never runs the device out of memory);
- the original's backup stays on the device while it fits (fast restore), else:
  ``keep_until_full`` puts it (and every later one) on the CPU; ``rotate`` moves the
  oldest device-resident backups to the CPU to make room, so the most recently merged
  modules, the likeliest to be restored and re-merged soon, keep fast backups.

``plan_merge`` is the pure decision; ``BudgetState`` holds the backups and counts what
happened so tests and benchmarks can see it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..modes import MERGE_STRATEGIES as STRATEGIES


@dataclass(frozen=True)
class MergePlan:
    compute_on_device: bool
    backup_on_device: bool
    offload_bytes: int  # device-resident backups to move to CPU first (rotate)


def plan_merge(free: int, scratch: int, backup: int, reserve: int, strategy: str, device_backups: int) -> MergePlan:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    on_device = free - scratch >= reserve
    if free - scratch - backup >= reserve:
        return MergePlan(on_device, True, 0)
    if strategy == "rotate":
        short = reserve - (free - scratch - backup)
        if short <= device_backups:
            return MergePlan(True if free + short - scratch >= reserve else on_device, True, short)
    return MergePlan(on_device, False, 0)


def default_free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass
class BudgetState:
    reserve_bytes: int
    strategy: str = "keep_until_full"
    free_bytes: Callable[[torch.device], int] = default_free_bytes
    stats: dict[str, int] = field(default_factory=lambda: {"cpu_fallbacks": 0, "device_backups": 0, "cpu_backups": 0, "offloaded": 0})
    # module -> backup tensor; insertion order is age (rotate offloads the oldest)
    backups: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)

    def device_backup_bytes(self, device: torch.device) -> int:
        return sum(t.numel() * t.element_size() for t in self.backups.values() if t.device == device)

    def offload(self, device: torch.device, nbytes: int) -> None:
        moved = 0
        for name, t in list(self.backups.items()):
            if moved >= nbytes:
                break
            if t.device == device and device.type != "cpu":
                self.backups[name] = t.to("cpu")
                moved += t.numel() * t.element_size()
                self.stats["offloaded"] += 1
            elif t.device == device:  # a CPU 'device' (tests): account for it all the same
                moved += t.numel() * t.element_size()
                self.stats["offloaded"] += 1
