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

import threading
from collections import OrderedDict

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


# The permutation is one ``index_select`` of element pairs with an index precomputed per shape
# (1.2-2.4x faster than the two steps below on Qwen-Image's factor shapes, bf16, CPU, appended
# to a base: ``python -m benchmarks.pack``, RESULTS.md "Packing"). Neighbouring columns (e = 0, 1) stay together in
# every tile, so a pair of elements is the unit for every dtype and the index depends on the
# shape only. Indices are built once by the two-step path and kept, least recently used first
# out, up to ``INDEX_BYTES``; a shape whose index is larger than that is packed by the two steps:
#   1. tiles into storage order: a 16-element tile row is contiguous on both sides, so it
#      moves as whole 16-byte (complex128) units;
#   2. inside each tile, one gather with a fixed index. Neighbouring columns (e = 0, 1)
#      stay together, so 1-, 2- and 4-byte dtypes are gathered as pairs of twice the width.
_PAIR = {1: torch.int16, 2: torch.int32, 4: torch.int64}
_UNIT = torch.complex128  # 16 bytes
_PAIR_UNIT = {**_PAIR, 8: torch.complex128}  # two elements of every width
_inner_cache: dict[tuple[int, bool, str], torch.Tensor] = {}

#: bytes of precomputed pack/unpack indices kept per process (every device together)
INDEX_BYTES = 64 << 20


class _Indices:
    """Packed pair j <- logical pair ``index[j]`` (``inverse``: logical <- packed), per
    (logical rows, cols, down, device), least recently used out first beyond ``INDEX_BYTES``."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, rows: int, cols: int, down: bool, inverse: bool, device: torch.device) -> torch.Tensor | None:
        size = rows * cols // 2 * 4  # int32 per pair
        if size > INDEX_BYTES:
            return None
        key = (rows, cols, down, inverse, str(device))
        with self._lock:
            idx = self._kept.get(key)
            if idx is not None:
                self._kept.move_to_end(key)
                return idx
        idx = _build_index(rows, cols, down, inverse).to(device)
        with self._lock:
            if key not in self._kept:
                self._kept[key] = idx
                self.bytes += size
            while self.bytes > INDEX_BYTES and len(self._kept) > 1:
                _, old = self._kept.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return idx


_indices = _Indices()


def _build_index(rows: int, cols: int, down: bool, inverse: bool) -> torch.Tensor:
    """The pair index of a padded logical (rows, cols) factor: the two-step packing of the pair
    numbers themselves (each int32 number sits where one pair of 2-byte elements would)."""
    numbers = torch.arange(rows * cols // 2, dtype=torch.int32)
    order = _pack_two_step(numbers.view(torch.int16).view(rows, cols), down).view(torch.int32).reshape(-1)
    return torch.argsort(order).to(torch.int32) if inverse else order


def _pairs(m: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's elements as one flat run of two-element units."""
    return m.reshape(-1).view(_PAIR_UNIT[m.element_size()])


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


def _pack_two_step(m: torch.Tensor, down: bool) -> torch.Tensor:
    """A padded, contiguous logical factor packed by the two steps; (P, rank) packed."""
    rows, cols = m.shape
    t = m.view(_UNIT).view(rows // TILE, TILE, cols // TILE, m.element_size())  # (nt, a, kt, b)
    # down stores k-tiles outermost; up stores n-tiles outermost
    tiles = (t.permute(2, 0, 1, 3) if down else t.permute(0, 2, 1, 3)).contiguous().view(m.dtype)
    x, pairs = _tile_view(tiles)
    x = torch.gather(x, 1, _inner_index(pairs, False, x.device).expand(x.shape))
    return x.view(-1).view(m.dtype).view((cols, rows) if down else (rows, cols))


def _unpack_two_step(w: torch.Tensor, down: bool) -> torch.Tensor:
    """A contiguous packed factor unpacked by the two steps; the padded logical factor."""
    if down:
        cols, rows = w.shape  # logical (rows=rank, cols=in)
        t1, t2 = cols // TILE, rows // TILE
    else:
        rows, cols = w.shape
        t1, t2 = rows // TILE, cols // TILE
    x, pairs = _tile_view(w)
    idx = _inner_index(pairs, True, x.device)
    tiles = torch.gather(x, 1, idx.expand(x.shape[0], -1)).view(-1).view(w.dtype)
    t = tiles.view(_UNIT).view(t1, t2, TILE, w.element_size())  # (T1, T2, a, b)
    m = t.permute(1, 2, 0, 3) if down else t.permute(0, 2, 1, 3)  # -> (nt, a, kt, b)
    return m.contiguous().view(w.dtype).view(rows, cols)


def pack_lowrank(w: torch.Tensor, down: bool, after: torch.Tensor | None = None) -> torch.Tensor:
    """Logical low-rank factor -> nunchaku's packed storage.

    ``down``: ``w`` is (rank, in) and the result (in_pad, rank_pad).
    ``up``:   ``w`` is (out, rank) and the result (out_pad, rank_pad).

    ``after``: a packed (P, r1) factor, r1 a multiple of 16, whose logical factor ``w``
    is appended to along the rank axis; the result is packed (P, r1 + rank_pad). In both
    layouts a 16-row block of P holds its rank tiles (256 values each) one after the
    other, so ``after``'s tiles are copied as they are (no repack of ``after``) and ``w``'s
    packed tiles go after them, block by block.
    """
    if w.dim() != 2:
        raise ValueError(f"pack_lowrank expects a 2-D tensor, got shape {tuple(w.shape)}")
    rows, cols = round_up(w.shape[0]), round_up(w.shape[1])
    p, r = (cols, rows) if down else (rows, cols)  # packed (P, rank)
    if after is not None and (after.dim() != 2 or after.shape[0] != p or after.shape[1] % TILE
                              or after.dtype != w.dtype):
        raise ValueError(f"cannot append a factor packing to {(p, r)} {w.dtype} to packed "
                         f"{tuple(after.shape)} {after.dtype}")
    m = pad_to(w, rows, cols).contiguous()
    idx = _indices.get(rows, cols, down, False, m.device)
    packed = _pack_two_step(m, down) if idx is None else _pairs(m).index_select(0, idx).view(w.dtype).view(p, r)
    if after is None:
        return packed
    # per 16-row block of P: after's tiles, then w's (``cat`` moves each block's run whole:
    # 1.1-2x faster than two strided copies into one new tensor, bf16, CPU)
    blocks = p // TILE
    out = torch.cat([after.contiguous().view(blocks, -1), packed.view(blocks, -1)], 1)
    return out.view(p, after.shape[1] + r)


def unpack_lowrank(w: torch.Tensor, down: bool) -> torch.Tensor:
    """Inverse of :func:`pack_lowrank`; keeps the padding.

    ``down``: ``w`` is packed (in_pad, rank_pad); returns (rank_pad, in_pad).
    ``up``:   ``w`` is packed (out_pad, rank_pad); returns (out_pad, rank_pad).
    """
    if w.dim() != 2 or w.shape[0] % TILE or w.shape[1] % TILE:
        raise ValueError(f"packed low-rank tensors are 2-D multiples of {TILE}, got {tuple(w.shape)}")
    rows, cols = (w.shape[1], w.shape[0]) if down else tuple(w.shape)
    w = w.contiguous()
    idx = _indices.get(rows, cols, down, True, w.device)
    if idx is None:
        return _unpack_two_step(w, down)
    return _pairs(w).index_select(0, idx).view(w.dtype).view(rows, cols)


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
