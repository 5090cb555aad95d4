"""Dense merge into ``nn.Linear``: W' = cast(W0 + B @ A) in fp32, checked finite, restorable.

The merge runs a block of rows at a time through one small fp32 scratch buffer that stays
in the CPU's cache: read W0's rows, add B[rows] @ A, cast them straight into the weight.
Whole-matrix fp32 temporaries (W.float(), the product, the cast) made the earlier version
~10x slower than a plain ``torch.mm`` of the same shapes; this one is ~1.3x
(``benchmarks/compose.py``). A switch between two compositions that touch the same module
reads W0 from the kept original (:func:`remerge`): no restore pass, no new backup copy.
"""
from __future__ import annotations

import weakref
from typing import MutableMapping

import torch
from torch import nn

from ..compose import ModuleUpdate
from ..errors import NonFiniteError
from .budget import BudgetState, plan_merge
from .ledger import Ledger

# fp32 scratch values per block of rows: 3 MiB stays in a core's cache on CPUs; on a GPU
# bigger blocks mean fewer kernel launches.
CHUNK_ELEMS = {"cpu": 3 << 18, "cuda": 1 << 24}


def chunk_rows(device: torch.device, in_features: int) -> int:
    return max(1, CHUNK_ELEMS.get(device.type, CHUNK_ELEMS["cuda"]) // max(1, in_features))


# dtypes whose own sum is a fast vectorized pass on CPU; asking for an fp32 result from
# bf16 / fp16 is ~7-14x slower there (measured on 14 MB: bf16 8.3 ms vs 0.59 ms)
_OWN_SUM = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    One sum is a single pass with no temporary: any NaN or Inf makes it non-finite. Only a
    sum that overflows from large finite values (easily in fp16) needs the exact
    elementwise check (profiled: ``isfinite(t).all()`` was ~30% of a warm dense switch).
    """
    total = t.sum() if t.dtype in _OWN_SUM else t.sum(dtype=torch.float32)
    if torch.isfinite(total):
        return True
    return bool(torch.isfinite(t).all())


# id(kept original weight) -> (weakref to it, its version, max |value|), for the bound below.
# Tensors compare elementwise, so a WeakKeyDictionary cannot hold them; the weakref makes sure
# a reused id is never served stale, the version counter catches in-place edits through torch
# ops. Writes that bypass the counter (``.data[...] =``, numpy views, a shared storage) are not
# seen: kept originals are the restore source and are never written in place.
_max_abs_of: dict[int, tuple[weakref.ref, int, float]] = {}


def max_abs(t: torch.Tensor) -> float:
    """max |t| in one pass with no full-size temporary; NaN when ``t`` holds one. Memoized
    for the same tensor at the same version (a kept original is read by every switch)."""
    if t.numel() == 0:
        return 0.0
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter: computed, not memoized
        version = None
    hit = _max_abs_of.get(id(t))
    if version is not None and hit is not None and hit[0]() is t and hit[1] == version:
        return hit[2]
    try:
        lo, hi = torch.aminmax(t)
        value = float(torch.maximum(lo.abs(), hi.abs()).float())  # NaN stays NaN
    except RuntimeError:  # a dtype aminmax does not take: no bound, so the check runs
        return float("nan")
    if version is not None:
        key = id(t)
        _max_abs_of[key] = (weakref.ref(t, lambda _r, key=key: _max_abs_of.pop(key, None)), version, value)
    return value


def _cannot_overflow(src_max_abs: float | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when ``src + B @ A`` is finite everywhere, stored in ``dtype``, by a bound alone:
    |src + B @ A| <= max|src| + sum_k max|B[:, k]| * max|A[k, :]|, kept under half the
    largest finite value of ``dtype`` (and of fp32, where it is computed) so that rounding
    in the product, the sum and the cast cannot reach it. NaN or Inf anywhere fails it."""
    if src_max_abs is None or not dtype.is_floating_point or a.numel() == 0 or b.numel() == 0:
        return False
    bound = src_max_abs + float((b.abs().amax(0) * a.abs().amax(1)).sum())
    return bound < min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 2  # False for NaN


def merge_rows(dst: torch.Tensor, src: torch.Tensor, update: ModuleUpdate, compute_on: torch.device | None = None,
               rows: int | None = None, src_max_abs: float | None = None) -> None:
    """``dst = cast(src.float() + B @ A)``, block by block of rows; ``src`` may be ``dst``.

    Checks the values as stored (so an overflow that happens only in the cast to fp16 is
    caught too) and raises :class:`NonFiniteError` when any is NaN or Inf. Rows are written
    as they go: on an error the caller puts ``dst`` back from its original. With
    ``src_max_abs`` (max |src|, see :func:`max_abs`) and no full-weight diff, a bound that
    rules out NaN and Inf replaces the check (profiled: the check's pass over the result
    was ~30% of a warm switch at rank 16, whose product is cheap).
    """
    compute_on = compute_on or dst.device
    a = update.A.to(compute_on, torch.float32)
    b = update.B.to(compute_on, torch.float32)
    diff = update.diff.to(compute_on, torch.float32) if update.diff is not None else None  # W += s*diff too
    n_out, n_in = dst.shape
    step = rows or chunk_rows(compute_on, n_in)
    scratch = torch.empty(min(step, n_out), n_in, dtype=torch.float32, device=compute_on)
    total = torch.zeros((), dtype=torch.float32, device=dst.device)
    check = diff is not None or not _cannot_overflow(src_max_abs, a, b, dst.dtype)
    own_sum = dst.dtype in _OWN_SUM  # the block's sum in its own dtype: ~5x faster than asking for fp32
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        s = scratch[: r1 - r0]
        s.copy_(src[r0:r1])
        s.addmm_(b[r0:r1], a)
        if diff is not None:
            s.add_(diff[r0:r1])
        d = dst[r0:r1]
        d.copy_(s)
        # NaN/Inf anywhere makes the sum non-finite (so does an overflowing sum: the exact
        # check below then decides); no sync per block
        if check:
            total += d.sum() if own_sum else d.sum(dtype=torch.float32)
    if check and not torch.isfinite(total) and not bool(torch.isfinite(dst).all()):
        raise NonFiniteError(f"merging into {update.module!r} gives NaN or Inf; nothing was changed")


def merged_weight(weight: torch.Tensor, update: ModuleUpdate) -> torch.Tensor:
    """A new fp32 tensor ``weight + B @ A`` on the weight's device, for callers that need
    the whole merged matrix (fp8 quantizes it); raises if not finite."""
    new = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    merge_rows(new, weight, update)
    return new


def _scratch_bytes(w: torch.Tensor, device: torch.device) -> int:
    return min(w.shape[0], chunk_rows(device, w.shape[1])) * w.shape[1] * 4


def _budgeted(w: torch.Tensor, budget: BudgetState, backup: bool = True) -> tuple[torch.device, torch.device]:
    nbytes = w.numel() * w.element_size() if backup else 0
    p = plan_merge(budget.free_bytes(w.device), _scratch_bytes(w, w.device), nbytes, budget.reserve_bytes,
                   budget.strategy, budget.device_backup_bytes(w.device))
    if p.offload_bytes:
        budget.offload(w.device, p.offload_bytes)
    cpu = torch.device("cpu")
    if not p.compute_on_device:
        budget.stats["cpu_fallbacks"] += 1
    if backup:
        budget.stats["device_backups" if p.backup_on_device else "cpu_backups"] += 1
    return (w.device if p.compute_on_device else cpu), (w.device if p.backup_on_device else cpu)


def merge(module: nn.Linear, update: ModuleUpdate, ledger: Ledger, originals: MutableMapping[str, torch.Tensor],
          keep_on: torch.device | str | None = None, budget: BudgetState | None = None) -> None:
    """Merge, keeping the original bytes in ``originals[name]`` (on ``keep_on``, default
    the weight's device) for an exact restore and for later :func:`remerge` calls.

    With a ``budget``, where the math runs and where the backup lives follow
    :func:`budget.plan_merge` (``keep_on`` is then ignored). On error the weight is as before.
    """
    w = module.weight
    name = update.module
    compute_on, backup_on = w.device, torch.device(keep_on) if keep_on is not None else w.device
    if budget is not None:
        compute_on, backup_on = _budgeted(w.data, budget)
    original = w.data.detach().to(backup_on, copy=True)
    try:
        merge_rows(w.data, w.data, update, compute_on, src_max_abs=max_abs(original))
    except BaseException:
        w.data.copy_(original)
        raise
    originals[name] = original

    def undo(w=w) -> None:
        w.data.copy_(originals.pop(name))

    ledger.record(name, undo)


def remerge(module: nn.Linear, update: ModuleUpdate, originals: MutableMapping[str, torch.Tensor],
            budget: BudgetState | None = None) -> None:
    """The module already holds another merge: write ``original + B @ A`` straight over it.
    On error the weight is left at its original (the caller's rollback expects that)."""
    w = module.weight
    src = originals[update.module]
    compute_on = _budgeted(w.data, budget, backup=False)[0] if budget is not None else w.device
    try:
        merge_rows(w.data, src, update, compute_on, src_max_abs=max_abs(src))
    except BaseException:
        w.data.copy_(src)
        raise
