"""Full-weight diffs: ``<module>.diff`` (a whole-tensor delta of a weight) and ``<module>.diff_b``
(of its bias), as ComfyUI's LoraSave extract node writes them beside ``lora_up``/``lora_down``.

Semantics are ComfyUI's (``comfy/lora.py``: a ``("diff", (tensor,))`` patch; ``calculate_weight``):
``W += strength * diff`` and ``b += strength * diff_b``, with no alpha and no rank scale (a
file's ``.alpha`` belongs to its low-rank pairs only). Here the sum runs in fp32 and is cast
to the parameter's dtype once. A diff is never a low-rank branch: it is merged into the
tensor it targets in every mode.

A diff target is bound by the very resolver the low-rank layers use (``lora_core.resolve``,
with the family maps of ``lora_core.families``): a BFL Flux ``double_blocks.0.img_attn.qkv.diff``
is split by rows onto ``to_q``/``to_k``/``to_v``, a ComfyUI-native Z-Image
``attention.qkv.diff`` likewise, a component of a module the model fuses (``w1`` inside
Z-Image's ``w13``, w3 first) lands at its rows, and a projection the model splits by input
(Flux single-block ``proj_out`` -> ``proj_out.linears.0/1``) gets the diff's columns for each
half (its bias goes to the one half that has a bias). Norms and other modules that are no
LoRA target are found by their own name or a family rename of it.

On nunchaku's Qwen-Image the modulation linears (``img_mod.1`` / ``txt_mod.1``, AWQ) emit
their six chunks interleaved (output row ``j*6 + c`` holds chunk ``c``, element ``j``; the
block de-interleaves with ``view(B, -1, 6).transpose(1, 2)``), so their dense bias is stored
in that order: a ``.diff_b`` written in the diffusers order is permuted exactly as the
low-rank up rows are (:func:`lora_core.nunchaku.reorder_modulation_rows`; nunchaku's own
Flux converter treats adaNorm bias diffs the same way). Their packed weight stays refused.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from .errors import ShapeMismatchError, TargetNotFoundError, UnsupportedFormatError, shown_list
from .families import expansions
from .keymap import strip_prefix
from .model_index import ModelIndex
from .nunchaku import reorder_modulation_rows
from .resolve import Placement, Unresolved, resolve

# key suffix -> the parameter of the target module it changes (``.diff_b`` tested first)
SUFFIXES = ((".diff_b", "bias"), (".diff", "weight"))
# module kinds whose weight is stored packed (4-bit): a dense delta cannot be added to it.
# fp8 can: its composition is merged into the kept master weight, then quantized.
PACKED_KINDS = ("svdq", "awq")


def split_keys(keys: Iterable[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """``(low-rank keys, {target: {"weight"|"bias": key}})``; targets stripped of containers."""
    rest: list[str] = []
    diffs: dict[str, dict[str, str]] = {}
    for key in keys:
        for suffix, param in SUFFIXES:
            if key.endswith(suffix):
                diffs.setdefault(strip_prefix(key[: -len(suffix)]), {})[param] = key
                break
        else:
            rest.append(key)
    return rest, diffs


def _names(index: ModelIndex) -> dict[str, str | None]:
    """Dotted and underscored names of every module with a weight or bias (norms too, which
    the index of LoRA targets leaves out); built once per index."""
    cached = index.__dict__.get("_diff_names")
    if cached is None:
        cached = {}
        for name, m in index.root.named_modules():
            if name and any(isinstance(getattr(m, p, None), torch.Tensor) for p in ("weight", "bias")):
                cached[name] = name
                u = name.replace(".", "_")
                cached[u] = None if (u in cached and cached[u] != name) else name  # None: ambiguous
        index.__dict__["_diff_names"] = cached
    return cached


def _placements(target: str, index: ModelIndex) -> list[Placement] | None:
    """Where a diff target lands: a LoRA-targetable module (or rows/columns of one, through
    the resolver), else any module with a weight or bias by its name or a family rename.
    The model's own name wins over any rename, as for the low-rank layers."""
    names = _names(index)

    def own(name: str) -> str | None:
        return names.get(name if "." in name else index.underscored.get(name) or name)

    found = own(target)
    if found is not None and found not in index.modules:  # a norm (or other non-LoRA module) by its own name
        return [Placement(found)]
    try:
        return resolve(target, index)
    except Unresolved:
        pass
    for exp in expansions(target):
        found = own(exp.names[0]) if len(exp.names) == 1 else None
        if found is not None:
            return [Placement(found, swap_halves=exp.swap_halves)]
    return None


def _param_of(index: ModelIndex, module: str, param: str) -> torch.Tensor | None:
    m = index.root.get_submodule(module)
    t = getattr(m, "master" if param == "weight" and index.kinds.get(module) == "fp8" else param, None)
    return t if isinstance(t, torch.Tensor) else None


def _pieces(diff: torch.Tensor, param: str, places: list[Placement], index: ModelIndex, source: str, key: str
            ) -> list[tuple[str, slice | None, torch.Tensor]]:
    """``(module, destination rows or None, the part of diff that lands there)`` per placement;
    shapes checked against the model, before anything is summed."""
    ends = [p.rows.stop for p in places if p.rows is not None]
    if ends and max(ends) != diff.shape[0]:
        raise ShapeMismatchError(f"diff has {diff.shape[0]} rows but the model's components add up to {max(ends)}",
                                 source=source, key=key)
    if param == "bias" and any(p.cols is not None for p in places):
        # a projection split by input: y = W0 x0 + W1 x1 + b, so b belongs to exactly one half
        places = [p for p in places if _param_of(index, p.module, "bias") is not None]
        if len(places) != 1:
            raise TargetNotFoundError(f"bias diff for a projection split by input needs exactly one part with a bias, "
                                      f"found {len(places)}", source=source, key=key)
    out = []
    for p in places:
        dst = _param_of(index, p.module, param)
        if dst is None:
            # ComfyUI skips such a key with a warning; we will not create a bias the
            # model never had (it would change its state dict and its kernels)
            raise TargetNotFoundError(f"module {p.module!r} has no {param} for this diff", source=source, key=key)
        part = diff[p.rows] if p.rows is not None else diff
        if p.cols is not None and param == "weight":
            part = part[:, p.cols]
        if p.swap_halves:  # BFL final modulation (shift, scale) -> diffusers (scale, shift)
            half = part.shape[0] // 2
            part = torch.cat([part[half:], part[:half]], 0)
        rows = None if p.offset is None else slice(p.offset, p.offset + part.shape[0])
        want = tuple(dst.shape) if rows is None else (rows.stop - rows.start, *dst.shape[1:])
        if tuple(part.shape) != want or (rows is not None and rows.stop > dst.shape[0]):
            what = f"{p.module}.{param}" + (f" rows {rows.start}:{rows.stop}" if rows is not None else "")
            src = "diff" if part is diff else "its part of the diff"
            raise ShapeMismatchError(f"{src} has shape {tuple(part.shape)} but {what} takes {want}",
                                     source=source, key=key)
        if index.interleaved(p.module):  # a bias (weights are refused in bind): diffusers order -> nunchaku's
            if rows is not None:
                full = part.new_zeros(dst.shape)
                full[rows] = part
                part, rows = full, None
            part = reorder_modulation_rows(part)
        out.append((p.module, rows, part))
    return out


def bind(pairs: Sequence[tuple[object, float]], index: ModelIndex, missing: list[str]
         ) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"weight"|"bias": Σ strength * diff (fp32, the parameter's full shape)}}``.

    Targets that match no module are appended to ``missing`` (the caller reports them with
    the low-rank ones); shape errors, a diff_b for a module without a bias, and a weight
    diff on a packed quantized weight raise here, before anything is touched."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    packed: list[str] = []
    for adapter, strength in pairs:
        for target, params in adapter.diffs.items():
            places = _placements(target, index)
            if places is None:
                missing.append(f"{target} (full-weight diff, from {adapter.source})")
                continue
            for param, diff in params.items():
                key = adapter.diff_keys.get((target, param), target)
                if param == "weight" and any(index.kinds.get(p.module) in PACKED_KINDS or index.interleaved(p.module)
                                             for p in places):
                    packed.append(f"{key} (from {adapter.source})")
                    continue
                for module, rows, part in _pieces(diff, param, places, index, adapter.source, key):
                    acc = out.setdefault(module, {}).get(param)
                    if acc is None:
                        dst = _param_of(index, module, param)
                        acc = out[module][param] = torch.zeros(dst.shape, dtype=torch.float32, device=diff.device)
                    (acc if rows is None else acc[rows]).add_(part.to(torch.float32), alpha=strength)
    if packed:
        raise UnsupportedFormatError(f"{len(packed)} full-weight diff(s) target a quantized (packed) weight, "
                                     f"which a dense delta cannot change (biases and norms can): "
                                     f"{shown_list(packed)}")
    return out


def nbytes(diffs: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for ps in diffs.values() for t in ps.values())


__all__ = ["SUFFIXES", "split_keys", "bind", "nbytes"]
