"""Dense merge into ``nn.Linear``: W' = cast(W_fp32 + B @ A), checked finite, restorable."""
from __future__ import annotations

import torch
from torch import nn

from ..compose import ModuleUpdate
from ..errors import NonFiniteError
from .ledger import Ledger


def merged_weight(weight: torch.Tensor, update: ModuleUpdate) -> torch.Tensor:
    """The new weight in fp32 on the weight's device; raises if any value is not finite."""
    a = update.A.to(weight.device)
    b = update.B.to(weight.device)
    new = torch.addmm(weight.float(), b, a)
    if not torch.isfinite(new).all():
        raise NonFiniteError(f"merging into {update.module!r} gives NaN or Inf; nothing was changed")
    return new


def merge(module: nn.Linear, update: ModuleUpdate, ledger: Ledger, keep_on: torch.device | str | None = None) -> None:
    """Merge, keeping the original bytes (on ``keep_on``, default the weight's device)."""
    w = module.weight
    new = merged_weight(w.data, update).to(w.dtype)
    original = w.data.detach().to(keep_on or w.device, copy=True)

    def undo(w=w, original=original) -> None:
        w.data.copy_(original)

    with torch.no_grad():
        w.data.copy_(new)
    ledger.record(update.module, undo)
