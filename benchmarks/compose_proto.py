"""PROTOTYPES of a faster dense merge, for the benchmark only: nothing here is in lora_core.

Both give bit-identical weights to ``lora_core.targets.dense.merge`` (checked in the run).

* ``fast_merge``: a drop-in for ``dense.merge`` (same contract: fp32 math cast back once,
  nothing kept unless every value is finite, a bit-exact undo copy) with two changes:

  1. the finite check sums the fp32 result first (one read pass, no temporaries: a sum is
     finite only if every term is) and runs the exact ``isfinite(...).all()`` only when the
     sum is not finite. ``torch.isfinite`` on a float tensor is composite
     (``(x == x) * (x.abs() != inf)``): a weight-sized fp32 ``abs`` plus three bool tensors.
  2. ``new = w.float(); new.addmm_(b, a)`` instead of ``torch.addmm(w.float(), b, a)``: one
     weight-sized fp32 buffer instead of two, one pass less.

* ``Resident``: a switch that keeps each touched module's original across compositions
  (what a ``Handle.switch(updates)`` in api.py could do): X -> Y computes W0 + dY straight
  from the kept original into the weight: no restore pass, no new backup copy, no free and
  re-allocation of the backup.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from lora_core.compose import ModuleUpdate
from lora_core.errors import NonFiniteError
from lora_core.model_index import ModelIndex
from lora_core.targets import dense
from lora_core.targets.ledger import Ledger

_ORIGINAL_MERGE = dense.merge


def all_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def fast_merged_weight(weight: torch.Tensor, update: ModuleUpdate) -> torch.Tensor:
    new = weight.float()  # a copy for bf16/fp16 weights; for fp32 ones, clone so W is not touched
    if new.data_ptr() == weight.data_ptr():
        new = new.clone()
    new.addmm_(update.B.to(weight.device), update.A.to(weight.device))
    if not all_finite(new):
        raise NonFiniteError(f"merging into {update.module!r} gives NaN or Inf; nothing was changed")
    return new


def fast_merge(module: nn.Linear, update: ModuleUpdate, ledger: Ledger, keep_on=None, budget=None, **kw) -> None:
    if budget is not None or kw:  # the VRAM-budget path is not prototyped: keep today's
        return _ORIGINAL_MERGE(module, update, ledger, keep_on=keep_on, budget=budget, **kw)
    w = module.weight
    new = fast_merged_weight(w.data, update).to(w.dtype)
    original = w.data.detach().to(keep_on or w.device, copy=True)

    def undo(w=w, original=original) -> None:
        w.data.copy_(original)

    with torch.no_grad():
        w.data.copy_(new)
    ledger.record(update.module, undo)


@contextlib.contextmanager
def patched_dense_merge() -> Iterator[None]:
    """api._apply_one calls ``dense.merge`` through the module: swap it for the block."""
    saved = dense.merge
    dense.merge = fast_merge
    try:
        yield
    finally:
        dense.merge = saved


class Resident:
    """Switches that keep each touched module's original across compositions.

    A prototype: a failure part-way leaves the earlier modules of this switch on the new
    composition (a real version would re-merge the previous updates, as ComposedModel does).
    """

    def __init__(self, index: ModelIndex):
        self.index = index
        self.originals: dict[str, torch.Tensor] = {}

    def switch(self, updates: Mapping[str, ModuleUpdate]) -> None:
        with torch.no_grad():
            for name in [n for n in self.originals if n not in updates]:
                self.index.modules[name].weight.data.copy_(self.originals.pop(name))
            for name, u in updates.items():
                w = self.index.modules[name].weight.data
                if name not in self.originals:
                    self.originals[name] = w.clone()
                w.copy_(fast_merged_weight(self.originals[name], u))

    def reset(self) -> None:
        self.switch({})
