"""The public entry points: load, apply (with an exact restore), and composition keys."""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapter import Adapter, Source, load_adapter, state_dict_id
from .compose import ModuleUpdate, plan
from .model_index import ModelIndex
from .safetensors_io import file_sha256
from .targets import dense, fp8, lowrank, svdq
from .targets.ledger import Ledger

MODES = ("merge", "lowrank")
BASE_KEY = "base"


class Handle:
    """What ``apply`` did; ``restore()`` puts every touched tensor back bit-exactly."""

    def __init__(self, ledger: Ledger, updates: Mapping[str, ModuleUpdate], mode: str):
        self._ledger = ledger
        self.updates = dict(updates)
        self.mode = mode
        self.branches: dict[str, lowrank.LowRankBranch] = {}

    @property
    def modules(self) -> list[str]:
        return self._ledger.modules

    def restore(self) -> None:
        self._ledger.rollback()

    @property
    def active(self) -> bool:
        return len(self._ledger) > 0


def apply(
    module: nn.Module,
    items: Sequence[tuple[Source, float]],
    mode: str = "merge",
    *,
    index: ModelIndex | None = None,
    allow_pickle: bool = False,
    storage_options: dict | None = None,
    keep_originals_on: torch.device | str | None = None,
    budget=None,
) -> Handle:
    """Compose ``items`` onto ``module``. On any error the model is left exactly as it was."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    index = index or ModelIndex(module)
    pairs = [(load_adapter(src, allow_pickle=allow_pickle, storage_options=storage_options), float(s)) for src, s in items]
    updates = plan(pairs, index)  # all binding errors before anything is touched
    return apply_updates(index, updates, mode, keep_originals_on=keep_originals_on, budget=budget)


def apply_updates(
    index: ModelIndex, updates: Mapping[str, ModuleUpdate], mode: str, *, keep_originals_on=None, budget=None
) -> Handle:
    """Land planned updates; ``budget`` (targets.budget.BudgetState) bounds dense merges."""
    ledger = Ledger()
    handle = Handle(ledger, updates, mode)
    try:
        with torch.no_grad():
            for name, update in updates.items():
                _apply_one(index, name, update, mode, ledger, handle, keep_originals_on, budget)
    except BaseException:
        ledger.rollback()
        raise
    return handle


def _apply_one(index: ModelIndex, name: str, update: ModuleUpdate, mode: str, ledger: Ledger, handle: Handle, keep_on,
               budget=None) -> None:
    m = index.modules[name]
    kind = index.kinds[name]
    if kind == "svdq":
        svdq.apply_svdq(m, update, ledger)
    elif kind == "fp8":  # always merged (into the master), then quantized
        fp8.apply_fp8(m, update, ledger)
    elif kind == "linear" and mode == "merge":
        dense.merge(m, update, ledger, keep_on=keep_on, budget=budget)
    else:  # lowrank mode, or an AWQ layer's side path
        if not (torch.isfinite(update.A).all() and torch.isfinite(update.B).all()):
            from .errors import NonFiniteError

            raise NonFiniteError(f"LoRA update for {name!r} is not finite; nothing was changed")
        dtype, device = lowrank.module_dtype_device(m)
        handle.branches[name] = lowrank.attach(m, update, ledger, dtype, device)


def content_id(source: Source, storage_options: dict | None = None) -> str:
    """The content id of a source without loading tensors where avoidable (file bytes)."""
    if isinstance(source, Adapter):
        return source.content_id
    if isinstance(source, Mapping):
        return state_dict_id(source)
    path = os.fspath(source)
    if "://" in path and not path.startswith("file://"):
        from .store import default_store

        return default_store(storage_options).fetch(path).sha256
    return file_sha256(path[len("file://"):] if path.startswith("file://") else path)


def key_of_ids(pairs: Iterable[tuple[str, float]]) -> str:
    """Composition key from (content id, strength): order-free, strength rounded to 1e-6."""
    parts = sorted(f"{cid}:{round(float(s), 6):.6f}" for cid, s in pairs if round(float(s), 6) != 0.0)
    if not parts:
        return BASE_KEY
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def composition_key(items: Sequence[tuple[Source, float]], storage_options: dict | None = None) -> str:
    return key_of_ids((content_id(src, storage_options), s) for src, s in items)
