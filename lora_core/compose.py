"""Composition: several (adapter, strength) pairs -> one low-rank update per model module.

ΔW = Σ strength · (alpha / rank) · B @ A. The scale is folded into B once, per file
target and so per component, before any fusion: a fused qkv LoRA scales q, k and v by its
own alpha/rank, never alpha/3r. Components landing in a fused module get their B rows
placed at their offset (zero elsewhere); concatenating terms along the rank axis then
gives A stacked and B block-diagonal. Adapters are ordered by content id so the result
does not depend on the caller's list order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import diffs
from .adapter import Adapter
from .errors import ShapeMismatchError, TargetNotFoundError, shown_list
from .formats import nunchaku_converted
from .model_index import ModelIndex
from .nunchaku import reorder_modulation_rows
from .resolve import Placement, Unresolved, resolve


@dataclass(frozen=True, eq=False)
class ModuleUpdate:
    """The whole composition for one module: ΔW = B @ A, scale already in B (fp32, or the
    dtype and device ``plan``'s ``where`` asked for)."""

    module: str
    kind: str
    A: torch.Tensor | None  # (R, in); None once an SVDQ update is packed (``api.prepare``)
    B: torch.Tensor | None  # (out, R); likewise
    ready: bool = False  # for a runtime branch: already in the module's dtype/device and checked finite
    packed: Any = None  # for an SVDQ layer: its packed branch, built by ``api.prepare`` (targets.svdq.Packed)
    # full-weight diffs (``lora_core.diffs``): Σ strength * diff for the weight and the bias,
    # fp32; always merged. ``kind == "diff"``: the module has no low-rank part (A, B None).
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        if self.A is None:
            raise ValueError(f"the update for {self.module!r} keeps only its packed branch; plan it again")
        return int(self.A.shape[0])


def ordered(pairs: Sequence[tuple[Adapter, float]]) -> list[tuple[Adapter, float]]:
    return sorted(((a, float(s)) for a, s in pairs if float(s) != 0.0), key=lambda p: (p[0].content_id, p[1]))


Where = Callable[[str], "tuple[torch.dtype, torch.device] | None"]


def plan(pairs: Sequence[tuple[Adapter, float]], index: ModelIndex, where: Where | None = None) -> dict[str, ModuleUpdate]:
    """Bind every layer of every adapter to the model; every problem reported at once.

    Each module's A (stacked) and B (side by side, scaled) are fp32 on the factors' device,
    or built straight in the dtype and device ``where(module)`` names (a runtime branch's:
    no fp32 copy to cast afterwards); either way B's values are the fp32 products
    strength x scale x B, rounded once."""
    terms: dict[str, list[_Term]] = {}
    missing: list[str] = []
    pairs = [(nunchaku_converted.bind(a, index), s) for a, s in pairs]  # its base part checked against the model
    for adapter, strength in ordered(pairs):
        for target, layer in adapter.layers.items():
            try:
                places = resolve(target, index, int(layer.B.shape[0]))
            except Unresolved:
                missing.append(f"{target} (from {adapter.source})")
                continue
            _check_coverage(places, layer.B.shape[0], adapter.source, target)
            scale = strength * layer.scale
            for module, ps in _by_module(places).items():
                parts = [_term(p, layer.A, layer.B, scale, index, adapter.source, target) for p in ps]
                if len(parts) > 1 and all(p.cols is None for p in ps) and all(t.a is layer.A for t in parts):
                    # one file layer on several row ranges of one fused module (a BFL qkv onto
                    # nunchaku's to_qkv): the same A, so one term of rank r, not r per range
                    parts = [_Term(parts[0].a, torch.stack([t.scaled() for t in parts]).sum(0), 1.0)]
                terms.setdefault(module, []).extend(parts)
    deltas = diffs.bind(ordered(pairs), index, missing)
    if missing:
        raise TargetNotFoundError(f"{len(missing)} LoRA target(s) match no module of the model: {shown_list(missing)}")
    out = {name: _stack(name, index.kinds[name], ts, where(name) if where else None) for name, ts in terms.items()}
    for name, d in deltas.items():
        if name in out:
            out[name] = dataclasses.replace(out[name], diff=d.get("weight"), diff_b=d.get("bias"))
        elif index.kinds.get(name) == "fp8" and "weight" in d:  # fused into the master, then quantized
            n_in, n_out = index.in_features(name), index.out_features(name)
            out[name] = ModuleUpdate(name, "fp8", torch.zeros(0, n_in), torch.zeros(n_out, 0), diff=d["weight"],
                                     diff_b=d.get("bias"))
        else:
            out[name] = ModuleUpdate(name, "diff", None, None, diff=d.get("weight"), diff_b=d.get("bias"))
    return out


@dataclass(frozen=True, eq=False)
class _Term:
    """One file layer's part of a module: ΔW += scale x b @ a (b unscaled, any float dtype;
    scale 1.0 where b is already the scaled fp32 product). With ``offset``, b holds only the
    rows ``offset ..`` of the module's ``out`` rows (a component of a fused module; zero
    elsewhere): it is written straight into its rows of the stacked B, never widened to all
    of them first."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r), or (rows, r) at ``offset``
    scale: float
    offset: int | None = None
    out: int = 0

    def scaled(self) -> torch.Tensor:
        """scale x b as a new fp32 tensor of all the module's rows."""
        if self.offset is None:
            return self.b.to(torch.float32, copy=True).mul_(self.scale)
        full = self.b.new_zeros(self.out, self.b.shape[1], dtype=torch.float32)
        full[self.offset : self.offset + self.b.shape[0]].copy_(self.b).mul_(self.scale)
        return full

    def write(self, out: torch.Tensor) -> None:
        """scale x b into ``out`` (out, r) (zeros outside b's rows already there): computed
        in fp32, rounded once to ``out``'s dtype."""
        if self.offset is not None:
            out = out[self.offset : self.offset + self.b.shape[0]]
        if self.b.dtype == out.dtype and self.b.device == out.device:
            torch.mul(self.b, self.scale, out=out)  # in fp32 for fp32 and narrower floats, rounded once
        elif out.dtype == torch.float32 and self.b.dtype in (torch.float16, torch.bfloat16, torch.float32):
            out.copy_(self.b).mul_(self.scale)  # an exact widening, then the fp32 product
        else:
            out.copy_(self.b.to(torch.float32, copy=True).mul_(self.scale))


def _stack(name: str, kind: str, terms: list[_Term], to: tuple[torch.dtype, torch.device] | None) -> ModuleUpdate:
    """A stacked along the rank, B's scaled terms side by side (by slice writes: ``torch.cat``
    along dim 1 takes a slow generic path on CPU for tall, narrow factors)."""
    dtype, device = to if to is not None else (torch.float32, terms[0].b.device)
    rank = sum(t.a.shape[0] for t in terms)
    n_out = max(t.out if t.offset is not None else t.b.shape[0] for t in terms)
    A = torch.empty(rank, terms[0].a.shape[1], dtype=dtype, device=device)
    # a component of a fused module fills only its rows: the rest are zeros
    new = torch.zeros if any(t.offset is not None for t in terms) else torch.empty
    B = new(n_out, rank, dtype=dtype, device=device)
    at = 0
    for t in terms:
        r = t.a.shape[0]
        A[at : at + r].copy_(t.a)  # exact, or one rounding to the target dtype
        t.write(B[:, at : at + r])  # the scale applied in fp32, rounded once (as ``scaled()`` then a cast)
        at += r
    return ModuleUpdate(name, kind, A, B)


def own_rank(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the rank columns of ``b`` that are all zero (and the rows of ``a`` they multiply).

    A fused file layer split by rows across several modules (ComfyUI-native Z-Image
    ``attention.qkv``: A (3r, in) stacked, B block-diagonal) gives each module B rows that
    are zero outside its own r columns; kept whole, every branch would cost 3r with 2/3
    zeros. The product is the same (the dropped terms are exact zeros; A is finite). Meta
    tensors (a header-only bind) have no values and are kept as they are."""
    if b.is_meta or b.shape[1] <= 1:
        return a, b
    used = (b != 0).any(0)
    if bool(used.all()):
        return a, b
    if not bool(used.any()):
        used[0] = True  # an all-zero part: keep one column so the term has a shape
    idx = used.nonzero().squeeze(1)
    return a.index_select(0, idx), b.index_select(1, idx)


def _by_module(places: list[Placement]) -> dict[str, list[Placement]]:
    out: dict[str, list[Placement]] = {}
    for p in places:
        out.setdefault(p.module, []).append(p)
    return out


def _check_coverage(places: list[Placement], out_rows: int, source: str, target: str) -> None:
    ends = [p.rows.stop for p in places if p.rows is not None]
    if ends and max(ends) != out_rows:
        raise ShapeMismatchError(
            f"LoRA up has {out_rows} rows but the model's components add up to {max(ends)}", source=source, key=target
        )


def _term(p: Placement, A: torch.Tensor, B: torch.Tensor, scale: float, index: ModelIndex, source: str,
          target: str) -> _Term:
    a = A[:, p.cols] if p.cols is not None else A
    src = B[p.rows] if p.rows is not None else B
    if p.rows is not None:
        a, src = own_rank(a, src)
    n_in, n_out = index.in_features(p.module), index.out_features(p.module)
    if a.shape[1] != n_in:
        raise ShapeMismatchError(
            f"LoRA down has {a.shape[1]} inputs but module {p.module!r} takes {n_in}", source=source, key=target
        )
    if p.offset is None and src.shape[0] != n_out:
        raise ShapeMismatchError(
            f"LoRA up has {src.shape[0]} outputs but module {p.module!r} gives {n_out}", source=source, key=target
        )
    if p.offset is not None and p.offset + src.shape[0] > n_out:
        raise ShapeMismatchError(f"LoRA up rows {p.offset}..{p.offset + src.shape[0]} fall outside module "
                                 f"{p.module!r}'s {n_out} outputs", source=source, key=target)
    if p.offset is None and not p.swap_halves and not index.interleaved(p.module):
        return _Term(a, src, scale)  # scaled as it is stacked, in the dtype the module wants
    if p.offset is not None and not p.swap_halves and not index.interleaved(p.module):
        return _Term(a, src, scale, p.offset, n_out)  # scaled straight into its rows of the fused module
    if p.offset is not None and not p.swap_halves:
        b = _Term(a, src, scale, p.offset, n_out).scaled()
    else:
        b = src.to(torch.float32, copy=True).mul_(scale)  # one new fp32 tensor, scaled in place
        if p.swap_halves:
            half = b.shape[0] // 2
            b = torch.cat([b[half:], b[:half]], 0)
        if p.offset is not None:
            full = b.new_zeros(n_out, b.shape[1])
            full[p.offset : p.offset + b.shape[0]] = b
            b = full
    if index.interleaved(p.module):
        b = reorder_modulation_rows(b)
    return _Term(a, b, 1.0)
