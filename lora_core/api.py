"""The public entry points: load, apply (with an exact restore), and composition keys."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapter import Adapter, Fetcher, Source, load_adapter, local_file, state_dict_id
from .compose import ModuleUpdate, Where, plan
from .errors import NonFiniteError
from .model_index import ModelIndex
from .modes import APPLY_MODES as MODES
from .safetensors_io import file_sha256
from .targets import dense, fp8, lowrank, param, svdq
from .targets.ledger import Ledger

BASE_KEY = "base"


class Handle:
    """What ``apply`` did; ``restore()`` puts every touched tensor back bit-exactly."""

    def __init__(self, ledger: Ledger, updates: Mapping[str, ModuleUpdate], mode: str,
                 originals: dict[str, torch.Tensor] | None = None):
        self._ledger = ledger
        self.updates = dict(updates)
        self.mode = mode
        self.branches: dict[str, lowrank.LowRankBranch] = {}
        # dense merges' original weights by module (a budget's backups dict when bounded)
        self.originals: dict[str, torch.Tensor] = {} if originals is None else originals
        self.merged: set[str] = set()  # modules merged densely by this handle

    @property
    def modules(self) -> list[str]:
        return self._ledger.modules

    def restore(self) -> None:
        self._ledger.rollback()
        self.branches.clear()
        self.merged.clear()

    @property
    def active(self) -> bool:
        return len(self._ledger) > 0

    def _adopt(self, other: "Handle") -> None:
        self._ledger, self.updates, self.mode = other._ledger, other.updates, other.mode
        self.branches, self.originals, self.merged = other.branches, other.originals, other.merged


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
    fetch: Fetcher | None = None,
) -> Handle:
    """Compose ``items`` onto ``module``. On any error the model is left exactly as it was.

    URL sources are fetched by ``fetch`` (see ``load_adapter``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    index = index or ModelIndex(module)
    pairs = [(load_adapter(src, allow_pickle=allow_pickle, storage_options=storage_options, fetch=fetch), float(s))
             for src, s in items]
    updates = plan(pairs, index, branch_targets(index, mode))  # all binding errors before anything is touched
    return apply_updates(index, updates, mode, keep_originals_on=keep_originals_on, budget=budget)


def apply_updates(
    index: ModelIndex, updates: Mapping[str, ModuleUpdate], mode: str, *, keep_originals_on=None, budget=None
) -> Handle:
    """Land planned updates; ``budget`` (targets.budget.BudgetState) bounds dense merges."""
    handle = Handle(Ledger(), updates, mode, originals=budget.backups if budget is not None else None)
    try:
        with torch.no_grad():
            for name, update in updates.items():
                _apply_one(index, name, update, handle, keep_originals_on, budget)
    except BaseException:
        handle.restore()
        raise
    return handle


def switch(
    index: ModelIndex, old: Handle | None, updates: Mapping[str, ModuleUpdate], mode: str, *, keep_originals_on=None,
    budget=None,
) -> Handle | None:
    """Move the model from ``old``'s composition (None: the base) to ``updates`` (empty:
    the base; returns None then).

    Modules both compositions merge densely go straight from their kept original to the
    new weight (no restore pass, no new backup); low-rank branches on both keep their hook
    and swap tensors. Everything else is restored, then applied. On any error the model
    holds ``old``'s composition again, bit for bit, and ``old`` stays valid.
    """
    if old is None or not old.active:
        return apply_updates(index, updates, mode, keep_originals_on=keep_originals_on, budget=budget) if updates else None
    keep_dense = {n for n in old.merged if n in updates and _route(index, updates[n], mode) == "dense"}
    keep_branch = {n for n in old.branches if n in updates and _route(index, updates[n], mode) == "lowrank"}
    handle = Handle(Ledger(), updates, mode, originals=old.originals)
    handle._ledger.extend(old._ledger.take(keep_dense | keep_branch))
    handle.merged, handle.branches = set(keep_dense), {n: old.branches[n] for n in keep_branch}
    old_updates, old_mode = old.updates, old.mode
    old.restore()  # everything else back to base
    try:
        with torch.no_grad():
            for name, update in updates.items():
                if name in keep_dense:
                    dense.remerge(index.modules[name], update, handle.originals, budget=budget)
                    _merge_diffs(index, update, handle, "dense")
                elif name in keep_branch:
                    _swap_branch(handle.branches[name], update)
                    _merge_diffs(index, update, handle, "lowrank")
                else:
                    _apply_one(index, name, update, handle, keep_originals_on, budget)
    except BaseException:
        handle.restore()
        old._adopt(apply_updates(index, old_updates, old_mode, keep_originals_on=keep_originals_on, budget=budget))
        raise
    return handle if updates else None


def _route(index: ModelIndex, update: ModuleUpdate, mode: str) -> str:
    """How ``update`` lands: ``diff`` (full-weight diffs only, merged in every mode) or its module's path."""
    return "diff" if update.kind == "diff" else _path(index.kinds[update.module], mode)


def mode_label(updates: Mapping[str, ModuleUpdate], mode: str) -> str:
    """The mode a result row reports: ``lowrank+merge`` when a low-rank composition also
    merged full-weight diffs (``.diff`` / ``.diff_b``) into weights or biases (a diff cannot be
    a runtime branch)."""
    if mode == "lowrank" and any(u.diff is not None or u.diff_b is not None for u in updates.values()):
        return "lowrank+merge"
    return mode


def _path(kind: str, mode: str) -> str:
    if kind in ("svdq", "fp8"):  # svdq concatenates; fp8 always merges into the master, then quantizes
        return kind
    return "dense" if kind == "linear" and mode == "merge" else "lowrank"  # lowrank mode, or AWQ's side path


def branch_targets(index: ModelIndex, mode: str) -> Where:
    """For ``plan``: the dtype and device of each module ``mode`` gives a runtime branch or
    an SVDQ low-rank branch, so its factors are built there (no fp32 copy to cast); None
    for the others (fp32: a dense merge multiplies in fp32)."""
    def where(name: str) -> tuple[torch.dtype, torch.device] | None:
        path = _path(index.kinds[name], mode)
        if path == "svdq":
            down = svdq.base_of(index.modules[name])[0]
            return down.dtype, down.device
        if path != "lowrank":
            return None
        return lowrank.module_dtype_device(index.modules[name])

    return where


def prepare(index: ModelIndex, updates: Mapping[str, ModuleUpdate], mode: str) -> dict[str, ModuleUpdate]:
    """Updates made ready to land: runtime branches cast to their module's dtype and device,
    SVDQ branches packed against the module's base; all checked finite. A caller that
    keeps them (per composition) switches back to that composition by swapping tensors
    only. Raises before anything is touched, whatever the model holds now.

    An SVDQ update keeps only its packed branch (its factors are dropped: the branch holds
    the same values, and kept both would double what a cache of them holds). It lands on
    the base it was packed against, which ``switch`` restores first; see ``still_fits``."""
    out = {}
    for name, u in updates.items():
        path = _route(index, u, mode)
        if path == "lowrank" and not u.ready:
            a, b = _checked_branch_tensors(u, *lowrank.module_dtype_device(index.modules[name]))
            u = dataclasses.replace(u, A=a, B=b, ready=True)
        elif path == "svdq" and u.packed is None:
            u = dataclasses.replace(u, A=None, B=None, packed=svdq.pack_update(index.modules[name], u))
        out[name] = u
    return out


def prepared_bytes(updates: Mapping[str, ModuleUpdate]) -> int:
    """Bytes a kept prepared composition holds: ready branch factors and packed SVDQ branches."""
    n = 0
    for u in updates.values():
        if u.ready:
            n += sum(t.numel() * t.element_size() for t in (u.A, u.B))
        if u.packed is not None:
            n += u.packed.nbytes
        n += sum(t.numel() * t.element_size() for t in (u.diff, u.diff_b) if t is not None)
    return n


def still_fits(index: ModelIndex, updates: Mapping[str, ModuleUpdate]) -> bool:
    """False when a prepared SVDQ branch was packed against a base that has changed since
    (its parameters replaced or edited in place): plan and prepare it again."""
    return all(u.packed.fits(*svdq.base_of(index.modules[n])[:2]) for n, u in updates.items() if u.packed is not None)


def _checked_branch_tensors(update: ModuleUpdate, dtype: torch.dtype, device: torch.device):
    a, b = update.A.to(device=device, dtype=dtype), update.B.to(device=device, dtype=dtype)
    if update.ready and a is update.A and b is update.B:
        return a, b
    if not (dense.all_finite(a) and dense.all_finite(b)):
        raise NonFiniteError(f"LoRA update for {update.module!r} is not finite; nothing was changed")
    return a, b


def _swap_branch(branch: lowrank.LowRankBranch, update: ModuleUpdate) -> None:
    branch.A, branch.B = _checked_branch_tensors(update, branch.A.dtype, branch.A.device)


def _apply_one(index: ModelIndex, name: str, update: ModuleUpdate, handle: Handle, keep_on, budget=None) -> None:
    path = _route(index, update, handle.mode)
    if path == "diff":
        _merge_diffs(index, update, handle, path)
        return
    m = index.modules[name]
    if path == "svdq":
        svdq.apply_svdq(m, update, handle._ledger)
    elif path == "fp8":
        fp8.apply_fp8(m, update, handle._ledger)
    elif path == "dense":
        dense.merge(m, update, handle._ledger, handle.originals, keep_on=keep_on, budget=budget)
        handle.merged.add(name)
    else:
        a, b = _checked_branch_tensors(update, *lowrank.module_dtype_device(m))
        handle.branches[name] = lowrank.attach(m, name, a, b, handle._ledger)
    _merge_diffs(index, update, handle, path)


def _merge_diffs(index: ModelIndex, update: ModuleUpdate, handle: Handle, path: str) -> None:
    """The full-weight diffs of ``update``: the bias always; the weight unless a dense merge
    or an fp8 fuse-then-quantize already added it in its one fp32 pass (``dense.merge_rows``)."""
    m = index.root.get_submodule(update.module)
    if update.diff is not None and path not in ("dense", "fp8"):
        param.merge_param(m, update.module, "weight", update.diff, handle._ledger)
    if update.diff_b is not None:
        param.merge_param(m, update.module, "bias", update.diff_b, handle._ledger)


def content_id(source: Source, storage_options: dict | None = None, fetch: Fetcher | None = None) -> str:
    """The content id of a source without loading tensors where avoidable (file bytes).

    A URL is fetched by ``fetch`` (see ``load_adapter``); a store's sha256 is used as is."""
    if isinstance(source, Adapter):
        return source.content_id
    if isinstance(source, Mapping):
        return state_dict_id(source)
    path, sha256 = local_file(os.fspath(source), fetch, storage_options)
    return sha256 or file_sha256(path)


def key_of_ids(pairs: Iterable[tuple[str, float]]) -> str:
    """Composition key from (content id, strength): order-free, strength rounded to 1e-6."""
    parts = sorted(f"{cid}:{round(float(s), 6):.6f}" for cid, s in pairs if round(float(s), 6) != 0.0)
    if not parts:
        return BASE_KEY
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def composition_key(
    items: Sequence[tuple[Source, float]], storage_options: dict | None = None, fetch: Fetcher | None = None
) -> str:
    """The content key of a composition: the same LoRAs at the same strengths, whatever their
    order or where they are stored, give the same key (``BASE_KEY`` for none)."""
    return key_of_ids((content_id(src, storage_options, fetch), s) for src, s in items)
