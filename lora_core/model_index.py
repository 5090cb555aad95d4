"""An index of a model's LoRA-targetable modules, built once per model.

It knows each module's kind (dense ``nn.Linear``, nunchaku ``SVDQW4A4Linear`` or
``AWQW4A16Linear``, matched by class name so CPU stand-ins work), its in/out features, the
fused groups the model has (``to_qkv`` <- ``to_q``/``to_k``/``to_v``; ``add_qkv_proj``;
Z-Image ``w13`` <- ``w3``/``w1``, w3 first), split projections (Flux single-block
``proj_out`` -> ``proj_out.linears.0/1``), and an underscored-name lookup for kohya files.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# fused module suffix -> its component suffixes, in the order their rows are stacked
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "w13": ("w3", "w1"),  # Z-Image: value (w3) first, then gate (w1)
}
QUANT_KINDS = {"SVDQW4A4Linear": "svdq", "AWQW4A16Linear": "awq", "FP8Linear": "fp8"}
# nunchaku's Qwen-Image emits these modulation outputs interleaved (index j*6+s)
INTERLEAVED_SUFFIXES = ("img_mod.1", "txt_mod.1")


@dataclass(frozen=True)
class Slot:
    """Where a component lives inside a fused module: rows [offset, offset + size)."""

    fused: str
    offset: int
    size: int


def module_kind(m: nn.Module) -> str | None:
    kind = QUANT_KINDS.get(type(m).__name__)
    if kind:
        return kind
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def _split(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


class ModelIndex:
    def __init__(self, root: nn.Module):
        self.root = root
        self.modules: dict[str, nn.Module] = {}
        self.kinds: dict[str, str] = {}
        for name, m in root.named_modules():
            kind = module_kind(m)
            if kind and name:
                self.modules[name] = m
                self.kinds[name] = kind
        self.nunchaku_layout = any(k in ("svdq", "awq") for k in self.kinds.values())
        self.slots = self._fused_slots()
        self.col_splits = self._col_splits()
        self.unfused = self._unfused_virtuals()
        self.underscored = self._underscore_map()

    # ---- shapes -------------------------------------------------------------------------
    def in_features(self, name: str) -> int:
        m = self.modules[name]
        return int(getattr(m, "in_features", None) or m.weight.shape[1])

    def out_features(self, name: str) -> int:
        m = self.modules[name]
        return int(getattr(m, "out_features", None) or m.weight.shape[0])

    def component_out(self, name: str) -> int | None:
        """Output width of a real module or of a component inside a fused one."""
        if name in self.modules:
            return self.out_features(name)
        if name in self.slots:
            return self.slots[name].size
        if name in self.unfused:
            return sum(self.component_out(c) or 0 for c in self.unfused[name])
        return None

    def interleaved(self, name: str) -> bool:
        return self.nunchaku_layout and name.endswith(INTERLEAVED_SUFFIXES)

    # ---- structure ----------------------------------------------------------------------
    def _fused_slots(self) -> dict[str, Slot]:
        slots: dict[str, Slot] = {}
        for name in self.modules:
            parent, leaf = _split(name)
            comps = FUSED_GROUPS.get(leaf)
            if not comps:
                continue
            size = self.out_features(name) // len(comps)
            for i, comp in enumerate(comps):
                slots[_join(parent, comp)] = Slot(name, i * size, size)
        return slots

    def _col_splits(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """Virtual ``P.proj_out`` -> ((``P.proj_out.linears.i``, col_start, col_end), ...)."""
        out: dict[str, tuple[tuple[str, int, int], ...]] = {}
        for name in self.modules:
            if name.endswith(".linears.0") and name[: -len(".0")] + ".1" in self.modules:
                base = name[: -len(".linears.0")]
                second = base + ".linears.1"
                n0 = self.in_features(name)
                out[base] = ((name, 0, n0), (second, n0, n0 + self.in_features(second)))
        return out

    def _unfused_virtuals(self) -> dict[str, tuple[str, ...]]:
        """Fused names a file may use (``P.to_qkv``) where the model keeps the parts."""
        out: dict[str, tuple[str, ...]] = {}
        for name in list(self.modules) + list(self.slots):
            parent, leaf = _split(name)
            for fused_leaf, comps in FUSED_GROUPS.items():
                if leaf == comps[0]:
                    names = tuple(_join(parent, c) for c in comps)
                    fused = _join(parent, fused_leaf)
                    if fused not in self.modules and all(n in self.modules for n in names):
                        out[fused] = names
        return out

    def _underscore_map(self) -> dict[str, str | None]:
        mapping: dict[str, str | None] = {}
        for name in [*self.modules, *self.slots, *self.col_splits, *self.unfused]:
            u = name.replace(".", "_")
            mapping[u] = None if (u in mapping and mapping[u] != name) else name  # None: ambiguous
        return mapping
