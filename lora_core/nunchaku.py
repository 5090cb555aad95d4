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
:func:`base_of` says where a module's own packed branch is while lora_core has one swapped in.
"""
from __future__ import annotations

import torch

TILE = 16


def pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x`` zero-padded to (rows, cols); ``x`` itself when it has that shape already."""
    if x.shape == (rows, cols):
        return x
    out = x.new_zeros(rows, cols)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def round_up(n: int, k: int = TILE) -> int:
    return (n + k - 1) // k * k


#: where ``targets.svdq`` keeps an SVDQ module's own branch while the module holds a composition
BASE_ATTR = "_lora_farm_base"


def base_of(module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An ``SVDQW4A4Linear``'s own packed branch (proj_down, proj_up, rank), also while it holds a
    composition (kept on the module from apply to restore; at the base, its live parameters). Here,
    below ``targets.svdq`` (which sets it) and ``formats.nunchaku_converted`` (which checks files against it)."""
    return module.__dict__.get(BASE_ATTR) or (module.proj_down, module.proj_up, int(module.rank))


# The permutation is done in two cheap steps instead of one 7-D strided copy (measured 6x
# faster for a 9216 x 576 bf16 factor on CPU):
#   1. tiles into storage order: a 16-element tile row is contiguous on both sides, so it
#      moves as whole 16-byte (complex128) units;
#   2. inside each tile, one gather with a fixed index. Neighbouring columns (e = 0, 1)
#      stay together, so 1-, 2- and 4-byte dtypes are gathered as pairs of twice the width.
_PAIR = {1: torch.int16, 2: torch.int32, 4: torch.int64}
_UNIT = torch.complex128  # 16 bytes
_inner_cache: dict[tuple[int, bool, str], torch.Tensor] = {}


def _inner_index(pairs: bool, inverse: bool, device: torch.device) -> torch.Tensor:
    """Storage position j of a tile <- logical position ``index[j]`` (``inverse``: the other way)."""
    key = (int(pairs), inverse, str(device))
    idx = _inner_cache.get(key)
    if idx is None:
        if pairs:  # logical (n_pack, n_lane, k_pack, k_lane) -> (n_lane, k_lane, n_pack, k_pack)
            idx = torch.arange(128).view(2, 8, 2, 4).permute(1, 3, 0, 2).reshape(-1)
        else:  # ... and e innermost on both sides
            idx = torch.arange(256).view(2, 8, 2, 4, 2).permute(1, 3, 0, 2, 4).reshape(-1)
        if inverse:
            idx = torch.argsort(idx)
        idx = _inner_cache[key] = idx.to(device)
    return idx


def _tile_view(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(T, elements per tile) of a tile-ordered tensor, as pairs where the width allows."""
    wide = _PAIR.get(m.element_size())
    flat = m.reshape(-1)
    if wide is None:
        return flat.view(torch.int64).view(-1, TILE * TILE), False
    return flat.view(wide).view(-1, TILE * TILE // 2), True


def pack_lowrank(w: torch.Tensor, down: bool, after: torch.Tensor | None = None) -> torch.Tensor:
    """Logical low-rank factor -> nunchaku's packed storage.

    ``down``: ``w`` is (rank, in) and the result (in_pad, rank_pad).
    ``up``:   ``w`` is (out, rank) and the result (out_pad, rank_pad).

    ``after``: a packed (P, r1) factor, r1 a multiple of 16, whose logical factor ``w``
    is appended to along the rank axis; the result is packed (P, r1 + rank_pad). In both
    layouts a 16-row block of P holds its rank tiles (256 values each) one after the
    other, so ``after``'s tiles are copied as they are and ``w``'s are gathered straight
    into their places (no repack of ``after``, no packed copy of ``w`` to append).
    """
    if w.dim() != 2:
        raise ValueError(f"pack_lowrank expects a 2-D tensor, got shape {tuple(w.shape)}")
    rows, cols = round_up(w.shape[0]), round_up(w.shape[1])
    m = pad_to(w, rows, cols).contiguous()
    units = m.element_size()  # 16-byte units in a 16-element tile row
    t = m.view(_UNIT).view(rows // TILE, TILE, cols // TILE, units)  # (nt, a, kt, b)
    # down stores k-tiles outermost; up stores n-tiles outermost
    tiles = (t.permute(2, 0, 1, 3) if down else t.permute(0, 2, 1, 3)).contiguous().view(w.dtype)
    x, pairs = _tile_view(tiles)
    p, r = (cols, rows) if down else (rows, cols)  # packed (P, rank)
    r1 = 0
    if after is not None:
        if after.dim() != 2 or after.shape[0] != p or after.shape[1] % TILE or after.dtype != w.dtype:
            raise ValueError(f"cannot append a factor packing to {(p, r)} {w.dtype} to packed "
                             f"{tuple(after.shape)} {after.dtype}")
        r1 = after.shape[1]
    e = x.shape[1]
    out = x.new_empty(p // TILE, (r1 + r) // TILE, e)
    if r1:
        out[:, : r1 // TILE].copy_(_tile_view(after.contiguous())[0].view(p // TILE, r1 // TILE, e))
    idx = _inner_index(pairs, False, x.device)
    lora = x.view(p // TILE, r // TILE, e)
    torch.gather(lora, 2, idx.expand(lora.shape), out=out[:, r1 // TILE :])
    return out.view(-1).view(w.dtype).view(p, r1 + r)


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
    x, pairs = _tile_view(w.contiguous())
    idx = _inner_index(pairs, True, x.device)
    tiles = torch.gather(x, 1, idx.expand(x.shape[0], -1)).view(-1).view(w.dtype)
    t = tiles.view(_UNIT).view(t1, t2, TILE, w.element_size())  # (T1, T2, a, b)
    m = t.permute(1, 2, 0, 3) if down else t.permute(0, 2, 1, 3)  # -> (nt, a, kt, b)
    return m.contiguous().view(w.dtype).view(rows, cols)


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


def chunk_major_modulation_rows(b: torch.Tensor, splits: int = 6) -> torch.Tensor:
    """Inverse of :func:`reorder_modulation_rows`: nunchaku's interleaved rows (``j*splits + s``)
    back to diffusers' chunk-major order (a nunchaku-converted file's modulation ups)."""
    out_features = b.shape[0]
    if out_features % splits:
        raise ValueError(f"modulation output {out_features} is not divisible by {splits}")
    dim = out_features // splits
    return b.reshape(dim, splits, *b.shape[1:]).transpose(0, 1).reshape(b.shape).contiguous()
