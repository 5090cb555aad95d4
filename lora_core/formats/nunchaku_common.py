"""What both layouts of nunchaku's converted LoRA files share: the error text, meta factors, padding crop."""
from __future__ import annotations

import torch

from ..errors import ShapeMismatchError

_ORIGINAL = "use the original LoRA file (lora_core packs it onto the SVDQ branch itself)"


def message(key: str, why: str, advice: str = _ORIGINAL) -> str:
    return f"unsupported adapter format: nunchaku-converted LoRA (key {key!r}): {why}; {advice}"


def meta(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device="meta")


def crop(a: torch.Tensor, b: torch.Tensor, places, index, keys: tuple[str, str], source: str):
    """The zero padding past the modules' inputs and outputs cut off (a packed factor's sides are
    multiples of 16); anything else there is an error naming the factor's key."""
    p = places[0]
    n_in = max(q.cols.stop for q in places) if p.cols is not None else index.in_features(p.module)
    rows = [q.rows.stop for q in places if q.rows is not None]
    n_out = max(rows) if rows else (index.out_features(p.module) if p.offset is None else b.shape[0])
    for t, side, n, key in ((a, 1, n_in, keys[0]), (b, 0, n_out, keys[1])):
        if t.shape[side] > n and not t.is_meta and t.narrow(side, n, t.shape[side] - n).any():
            raise ShapeMismatchError(f"the factor is {t.shape[side]} wide where the model's module has {n}, and "
                                     "the rest is not zero padding", source=source, key=key)
    return a[:, : min(a.shape[1], n_in)], b[: min(b.shape[0], n_out)]

