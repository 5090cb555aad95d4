"""Binding a file target to the model: which module(s), which rows/columns, where.

A file target may be a plain module, a component of a module the model fuses (q into
``to_qkv``), a fused name the model keeps apart (``to_qkv`` onto ``to_q/k/v``), a
Black Forest Labs name (``single_blocks.0.linear1`` -> q, k, v, proj_mlp), or a
projection the model splits by input (Flux single-block ``proj_out`` onto
``proj_out.linears.0/1``). Each becomes a list of :class:`Placement`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .families import expansions
from .model_index import ModelIndex


@dataclass(frozen=True)
class Placement:
    module: str
    rows: slice | None = None  # rows of the file's B that belong here
    cols: slice | None = None  # columns of the file's A that belong here
    offset: int | None = None  # row offset inside a fused module (B is zero elsewhere)
    swap_halves: bool = False


class Unresolved(Exception):
    pass


def resolve(target: str, index: ModelIndex, out_rows: int | None = None) -> list[Placement]:
    """Placements for one file target (``out_rows``: its B's rows, kept for callers); Unresolved
    if none. The model's own name wins over any family rename; of the family readings
    (``families.expansions``) the first the model has wins."""
    direct = _one(_canonical(target, index), index, None)
    if direct is not None:
        return direct
    for exp in expansions(target):
        if len(exp.names) == 1:
            places = _one(_canonical(exp.names[0], index), index, None)
        else:
            places = _split_rows([_canonical(n, index) for n in exp.names], index, None)
        if places is not None:
            if exp.swap_halves:
                places = [Placement(p.module, p.rows, p.cols, p.offset, True) for p in places]
            return places
    raise Unresolved(target)


def _canonical(name: str, index: ModelIndex) -> str:
    if "." in name or name in index.modules:
        return name
    return index.underscored.get(name) or name


def _one(name: str, index: ModelIndex, rows: slice | None) -> list[Placement] | None:
    if name in index.modules:
        return [Placement(name, rows)]
    slot = index.slots.get(name)
    if slot is not None:
        return [Placement(slot.fused, rows, offset=slot.offset)]
    if name in index.col_splits:
        return [Placement(part, rows, cols=slice(c0, c1)) for part, c0, c1 in index.col_splits[name]]
    if name in index.unfused:
        return _split_rows(list(index.unfused[name]), index, rows)
    return None


def _split_rows(names: list[str], index: ModelIndex, rows: slice | None) -> list[Placement] | None:
    """B rows split across components in order, by each component's width in the model."""
    widths = [index.component_out(n) for n in names]
    if any(w is None for w in widths):
        return None
    start = rows.start if rows is not None else 0
    places: list[Placement] = []
    for name, width in zip(names, widths):
        sub = _one(name, index, slice(start, start + width))
        if sub is None:
            return None
        places.extend(sub)
        start += width
    return places
