"""Dense merge into ``nn.Linear``: W' = cast(W_fp32 + B @ A), checked finite, restorable."""
from __future__ import annotations

import torch
from torch import nn

from ..compose import ModuleUpdate
from ..errors import NonFiniteError
from .budget import BudgetState, plan_merge
from .ledger import Ledger


def _budgeted(w: torch.Tensor, update: ModuleUpdate, budget: BudgetState) -> tuple[torch.device, torch.device]:
    nbytes = w.numel() * w.element_size()
    scratch = 2 * w.numel() * 4  # fp32 copy of W + the B@A product
    p = plan_merge(budget.free_bytes(w.device), scratch, nbytes, budget.reserve_bytes, budget.strategy,
                   budget.device_backup_bytes(w.device))
    if p.offload_bytes:
        budget.offload(w.device, p.offload_bytes)
    cpu = torch.device("cpu")
    if not p.compute_on_device:
        budget.stats["cpu_fallbacks"] += 1
    budget.stats["device_backups" if p.backup_on_device else "cpu_backups"] += 1
    return (w.device if p.compute_on_device else cpu), (w.device if p.backup_on_device else cpu)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    One fp32-accumulated sum is a single pass with no temporary: any NaN or Inf makes it
    non-finite. Only a sum that overflows from huge finite values needs the exact
    elementwise check (profiled: ``isfinite(t).all()`` was ~30% of a warm dense switch).
    """
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(t).all())


def merged_weight(weight: torch.Tensor, update: ModuleUpdate, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The new weight (fp32 math, cast once to ``dtype``, default fp32) on the weight's
    device; raises if any value of the result is not finite, which also catches values
    that overflow only in the cast (fp16 tops out at 65504)."""
    a = update.A.to(weight.device)
    b = update.B.to(weight.device)
    new = torch.addmm(weight.float(), b, a)
    if dtype is not None and dtype != new.dtype:
        new = new.to(dtype)
    if not all_finite(new):
        raise NonFiniteError(f"merging into {update.module!r} gives NaN or Inf; nothing was changed")
    return new


def merge(module: nn.Linear, update: ModuleUpdate, ledger: Ledger, keep_on: torch.device | str | None = None,
          budget: BudgetState | None = None) -> None:
    """Merge, keeping the original bytes (on ``keep_on``, default the weight's device).

    With a ``budget``, where the math runs and where the backup lives follow
    :func:`budget.plan_merge` (``keep_on`` is then ignored).
    """
    w = module.weight
    compute_on, backup_on = w.device, keep_on or w.device
    if budget is not None:
        compute_on, backup_on = _budgeted(w.data, update, budget)
    new = merged_weight(w.data.to(compute_on), update, dtype=w.dtype).to(w.device)
    original = w.data.detach().to(backup_on, copy=True)
    if budget is not None:
        budget.backups[update.module] = original

    def undo(w=w, name=update.module) -> None:
        src = budget.backups.pop(name) if budget is not None else original
        w.data.copy_(src)

    with torch.no_grad():
        w.data.copy_(new)
    ledger.record(update.module, undo)
