"""Full-weight diffs: ``<module>.diff`` (a whole-tensor delta of a weight) and ``<module>.diff_b``
(of its bias), as ComfyUI's LoraSave extract node writes them beside ``lora_up``/``lora_down``.

Semantics are ComfyUI's (``comfy/lora.py``: a ``("diff", (tensor,))`` patch; ``calculate_weight``):
``W += strength * diff`` and ``b += strength * diff_b``, with no alpha and no rank scale (a
file's ``.alpha`` belongs to its low-rank pairs only). Here the sum runs in fp32 and is cast
to the parameter's dtype once. A diff is never a low-rank branch: it is merged into the
tensor it targets in every mode.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from .errors import ShapeMismatchError, TargetNotFoundError, UnsupportedFormatError, shown_list
from .keymap import strip_prefix
from .model_index import ModelIndex

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


def _place(target: str, index: ModelIndex) -> tuple[str, slice | None] | None:
    """(module, rows inside it) for a diff target: a module, or a component of a fused one."""
    name = target if "." in target else index.underscored.get(target) or target
    slot = index.slots.get(name)
    if slot is not None and name not in index.modules:
        return slot.fused, slice(slot.offset, slot.offset + slot.size)
    found = _names(index).get(name)
    return (found, None) if found is not None else None


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
            place = _place(target, index)
            if place is None:
                missing.append(f"{target} (full-weight diff, from {adapter.source})")
                continue
            module, rows = place
            m = index.root.get_submodule(module)
            for param, diff in params.items():
                key = adapter.diff_keys.get((target, param), target)
                if (param == "weight" and index.kinds.get(module) in PACKED_KINDS) or index.interleaved(module):
                    # nunchaku's modulation rows are interleaved: a bias diff in file order would land wrong
                    packed.append(f"{key} (from {adapter.source})")
                    continue
                dst = getattr(m, "master" if param == "weight" and index.kinds.get(module) == "fp8" else param, None)
                if not isinstance(dst, torch.Tensor):
                    # ComfyUI skips such a key with a warning; we will not create a bias the
                    # model never had (it would change its state dict and its kernels)
                    raise TargetNotFoundError(f"module {module!r} has no {param} for this diff", source=adapter.source,
                                              key=key)
                want = tuple(dst.shape) if rows is None else (rows.stop - rows.start, *dst.shape[1:])
                if tuple(diff.shape) != want:
                    raise ShapeMismatchError(f"diff has shape {tuple(diff.shape)} but {module}.{param} takes {want}",
                                             source=adapter.source, key=key)
                acc = out.setdefault(module, {}).get(param)
                if acc is None:
                    acc = out[module][param] = torch.zeros(dst.shape, dtype=torch.float32, device=diff.device)
                (acc if rows is None else acc[rows]).add_(diff.to(torch.float32), alpha=strength)
    if packed:
        raise UnsupportedFormatError(f"{len(packed)} full-weight diff(s) target a quantized (packed) weight or "
                                     f"nunchaku's interleaved modulation, which a dense delta cannot change: "
                                     f"{shown_list(packed)}")
    return out


def nbytes(diffs: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for ps in diffs.values() for t in ps.values())


__all__ = ["SUFFIXES", "split_keys", "bind", "nbytes"]
