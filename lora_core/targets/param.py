"""A full-weight diff merged into one parameter: p' = cast(p0 + delta) in fp32, checked
finite, the original bytes kept for a bit-exact restore (norm weights, biases, the weight
of a layer whose low-rank part is a runtime branch)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NonFiniteError
from .dense import all_finite
from .ledger import Ledger


def merge_param(module: nn.Module, name: str, param: str, delta: torch.Tensor, ledger: Ledger) -> None:
    """Add ``delta`` (fp32, the parameter's shape) to ``module.<param>``; recorded in ``ledger``
    as ``name#param`` so a switch that keeps the module's weight merge still restores it."""
    t = getattr(module, param)
    new = t.data.to(torch.float32, copy=True)
    new += delta.to(new.device)
    cast = new.to(t.dtype)
    if not all_finite(cast):
        raise NonFiniteError(f"merging the full-weight diff into {name}.{param} gives NaN or Inf; nothing was changed")
    original = t.data.clone()
    t.data.copy_(cast)

    def undo(t=t, original=original) -> None:
        t.data.copy_(original)

    ledger.record(f"{name}#{param}", undo)
