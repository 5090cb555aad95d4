"""Nunchaku's packed low-rank layout, as pure tensor permutations.

``SVDQW4A4Linear`` keeps its low-rank branch packed for its CUDA kernel: ``proj_down`` is
stored (in_pad, rank_pad) and ``proj_up`` (out_pad, rank_pad), each dimension zero-padded
to a multiple of 16. Packing permutes 16x16 tiles: tiles are laid out in row-major order
(down: k-tile then r-tile; up: n-tile then r-tile) and inside a tile the element at row
``a = 8*n_pack + n_lane`` and column ``b = 8*k_pack + 2*k_lane + e`` goes to offset
``32*n_lane + 8*k_lane + 4*n_pack + 2*k_pack + e``. Because it is a permutation, pack and
unpack are exact for every dtype; ``tests/lora_core/test_nunchaku_pack.py`` checks both
against ground truth produced by nunchaku's own code.

Here a tile's rows ("n") run along the rank axis for ``down`` and along the output axis for
``up``; its columns ("k") run along the input axis for ``down`` and along rank for ``up``.
"""
from __future__ import annotations

import torch

TILE = 16


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if x.shape == (rows, cols):
        return x
    out = x.new_zeros(rows, cols)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def round_up(n: int, k: int = TILE) -> int:
    return (n + k - 1) // k * k


# Each packed pair of neighbouring columns (``e`` = 0, 1) stays together, so the permutation
# moves pairs: viewing the pair as one element of twice the width halves the elements the
# strided copy handles (measured: ~2x faster for bf16 on CPU).
_WIDE = {1: torch.int16, 2: torch.int32, 4: torch.int64}


def _paired(m: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A contiguous (rows, cols) tensor as (rows, cols // e) elements of e-fold width."""
    wide = _WIDE.get(m.element_size())
    if wide is None:
        return m, 1
    return m.view(wide), 2


def pack_lowrank(w: torch.Tensor, down: bool) -> torch.Tensor:
    """Logical low-rank factor -> nunchaku's packed storage.

    ``down``: ``w`` is (rank, in) and the result (in_pad, rank_pad).
    ``up``:   ``w`` is (out, rank) and the result (out_pad, rank_pad).
    """
    if w.dim() != 2:
        raise ValueError(f"pack_lowrank expects a 2-D tensor, got shape {tuple(w.shape)}")
    rows, cols = round_up(w.shape[0]), round_up(w.shape[1])
    m, e = _paired(_pad_to(w, rows, cols).contiguous())
    t = m.view(rows // TILE, TILE, cols // TILE, TILE // e)  # (nt, a, kt, b/e)
    t = t.permute(2, 0, 1, 3) if down else t.permute(0, 2, 1, 3)  # down stores k-tiles outermost; up n-tiles
    # a = 8*n_pack + n_lane; b = 8*k_pack + 2*k_lane + e -> offset 32*n_lane + 8*k_lane + 4*n_pack + 2*k_pack + e
    t = t.reshape(*t.shape[:2], 2, 8, 2, 4 if e == 2 else 8)
    if e == 2:  # (n_pack, n_lane, k_pack, k_lane) -> (n_lane, k_lane, n_pack, k_pack), the pair stays whole
        t = t.permute(0, 1, 3, 5, 2, 4)
    else:
        t = t.reshape(*t.shape[:5], 4, 2).permute(0, 1, 3, 5, 2, 4, 6)
    flat = t.contiguous().view(-1).view(w.dtype)
    return flat.view(cols, rows) if down else flat.view(rows, cols)


def unpack_lowrank(w: torch.Tensor, down: bool) -> torch.Tensor:
    """Inverse of :func:`pack_lowrank`; keeps the padding.

    ``down``: ``w`` is packed (in_pad, rank_pad); returns (rank_pad, in_pad).
    ``up``:   ``w`` is packed (out_pad, rank_pad); returns (out_pad, rank_pad).
    """
    if w.dim() != 2 or w.shape[0] % TILE or w.shape[1] % TILE:
        raise ValueError(f"packed low-rank tensors are 2-D multiples of {TILE}, got {tuple(w.shape)}")
    if down:
        cols, rows = w.shape  # logical (rows=rank, cols=in)
        t1, t2 = cols // TILE, rows // TILE
    else:
        rows, cols = w.shape
        t1, t2 = rows // TILE, cols // TILE
    m, e = _paired(w.contiguous())
    if e == 2:  # (n_lane, k_lane, n_pack, k_pack) -> (n_pack, n_lane, k_pack, k_lane)
        t = m.view(t1, t2, 8, 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
    else:
        t = m.view(t1, t2, 8, 4, 2, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
    t = t.reshape(t1, t2, TILE, TILE // e)  # (T1, T2, a, b/e)
    m = t.permute(1, 2, 0, 3) if down else t.permute(0, 2, 1, 3)  # -> (nt, a, kt, b/e)
    return m.reshape(rows, cols // e).contiguous().view(w.dtype)


def append_packed(packed: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Packed (P, r1) and packed (P, r2), both with ranks that are multiples of 16, ->
    the packed (P, r1 + r2) of their logical factors concatenated along the rank axis.

    In both layouts a 16-row block of P holds its rank tiles (256 values each) one after
    the other, so concatenating along rank is a copy of whole tiles, never a repack."""
    if packed.shape[0] != extra.shape[0] or packed.shape[1] % TILE or extra.shape[1] % TILE:
        raise ValueError(f"cannot append packed {tuple(extra.shape)} to packed {tuple(packed.shape)}")
    p = packed.shape[0] // TILE
    out = torch.cat([packed.reshape(p, -1, TILE * TILE), extra.reshape(p, -1, TILE * TILE)], 1)
    return out.view(packed.shape[0], packed.shape[1] + extra.shape[1])


def reorder_modulation_rows(b: torch.Tensor, splits: int = 6) -> torch.Tensor:
    """Chunk-major output rows -> nunchaku's interleaved order (row ``j*splits + s``).

    Diffusers' Qwen-Image ``img_mod.1`` emits [shift1|scale1|gate1|shift2|scale2|gate2], each
    ``dim`` wide; nunchaku's quantized layer emits them interleaved, so a LoRA B trained on
    the diffusers layout is permuted before it is concatenated or side-pathed there.
    """
    out_features = b.shape[0]
    if out_features % splits:
        raise ValueError(f"modulation output {out_features} is not divisible by {splits}")
    dim = out_features // splits
    return b.reshape(splits, dim, *b.shape[1:]).transpose(0, 1).reshape(b.shape).contiguous()
