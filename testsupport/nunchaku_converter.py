"""nunchaku-converted LoRAs (Qwen-Image, and Flux: :func:`to_nunchaku_flux`), written the way its converters write them.

From the tools' public code (facts; the sources are named in ``lora_core/formats/nunchaku_converted.py``):
the Qwen-Image converter (nunchaku-tech/nunchaku, unmerged commit 061b23f, ``nunchaku/lora/qwenimage/
nunchaku_converter.py``) takes a LoRA in diffusers names, q/k/v already fused into ``attn.to_qkv`` /
``attn.add_qkv_proj`` (its ``compose_lora``: one shared down -> ups stacked, else downs stacked and ups
block-diagonal) with alpha/rank folded into the down (as nunchaku's ``to_diffusers`` folds a kohya ``.alpha``:
``A * alpha / rank`` in the factor's dtype). For each block the LoRA touches and each of its ten layers:

- the eight SVDQ layers: with a base, the layer's own packed ``proj_down`` / ``proj_up`` unpacked and put
  first, the LoRA's factors after it along the rank (a layer the LoRA does not touch: the base alone), cast to
  bf16 and packed again (both sides zero-padded to 16); without a base, the LoRA's own layers only;
- ``img_mod.1`` / ``txt_mod.1`` (AWQ, no base branch): the down rank-padded to 16, the up's rows interleaved
  (row ``j*6 + s`` <- chunk ``s``, row ``j``) and rank-padded, not packed;

as bare ``transformer_blocks.N.<layer>.lora_down`` / ``.lora_up``, no header metadata. The 2x
"amplification" that branch's ``compose_lora`` multiplies into a composed LoRA is left out: it is not part
of a file the converter writes from one LoRA.

Flux (nunchaku main, ``nunchaku/lora/flux/nunchaku_converter.py``; facts in ``lora_core/formats/nunchaku_flux.py``):
every block of the base checkpoint, every W4A4 layer: the base's branch first, the LoRA's (alpha folded, q/k/v
fused, a single block's ``proj_out`` split by input columns with the up copied, fc1/fc2 ranks equalised) after
it, in the base's dtype, packed; modulation as for Qwen-Image (3 splits in single blocks); keys outside the
blocks as ``to_diffusers`` left them; no metadata. The base is a stand-in (:func:`fake_flux_base`).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from lora_core.nunchaku import pack_lowrank, round_up, unpack_lowrank
from lora_core.synthetic import Layer

SVDQ = ("attn.to_qkv", "attn.add_qkv_proj", "attn.to_out.0", "attn.to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
MODULATION = ("img_mod.1", "txt_mod.1")
_FUSE = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_BLOCK = re.compile(r"^(transformer_blocks\.\d+)\.(.+)$")


def folded(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A·alpha/rank, B), the fold in the factor's own dtype, as nunchaku's ``to_diffusers`` does it."""
    a, b, alpha = layer
    return a * torch.tensor(alpha, dtype=torch.float32) / a.shape[0], b


def fuse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v as one factor pair: a shared down keeps one down and stacks the ups; else the
    downs are stacked and the ups placed block-diagonally."""
    if all(torch.equal(a, parts[0][0]) for a, _ in parts):
        return parts[0][0], torch.cat([b for _, b in parts], 0)
    down = torch.cat([a for a, _ in parts], 0)
    up = torch.zeros(sum(b.shape[0] for _, b in parts), down.shape[0], dtype=parts[0][1].dtype)
    r = c = 0
    for _, b in parts:
        up[c : c + b.shape[0], r : r + b.shape[1]] = b
        r, c = r + b.shape[1], c + b.shape[0]
    return down, up


def interleave(up: torch.Tensor, splits: int = 6) -> torch.Tensor:
    """Chunk-major rows -> the AdaNorm order nunchaku's converter writes (row ``j*splits + s``)."""
    c, r = up.shape
    return up.view(splits, c // splits, r).transpose(0, 1).reshape(c, r).contiguous()


def rank_padded(t: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = round_up(shape[dim])
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def to_nunchaku(lora: Mapping[str, Layer], base: nn.Module | None = None,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The converted state dict of ``lora`` (``{diffusers Qwen-Image module: (A, B, alpha)}``),
    against ``base`` (a model with nunchaku's SVDQ layers: their own branch goes first) or none."""
    by_block: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, layer in lora.items():
        block, leaf = _BLOCK.match(name).groups()
        by_block.setdefault(block, {})[leaf] = folded(layer)
    mods = dict(base.named_modules()) if base is not None else {}
    sd: dict[str, torch.Tensor] = {}
    for block, leaves in sorted(by_block.items()):
        for leaf, parts in _FUSE.items():
            if any(p in leaves for p in parts):
                leaves[leaf] = fuse([leaves.pop(p) for p in parts])
        for leaf in SVDQ + MODULATION:
            own = mods.get(f"{block}.{leaf}")
            extra = leaves.get(leaf)
            if own is not None and hasattr(own, "proj_down"):
                d0, u0 = unpack_lowrank(own.proj_down.data, True), unpack_lowrank(own.proj_up.data, False)
                down, up = (d0, u0) if extra is None else (torch.cat([d0, extra[0]], 0), torch.cat([u0, extra[1]], 1))
            elif extra is not None:
                down, up = extra
            else:
                continue
            down, up = down.to(dtype), up.to(dtype)
            key = f"{block}.{leaf}"
            if leaf in MODULATION:
                sd[f"{key}.lora_down"], sd[f"{key}.lora_up"] = rank_padded(down, 0), rank_padded(interleave(up), 1)
            else:
                sd[f"{key}.lora_down"], sd[f"{key}.lora_up"] = pack_lowrank(down, True), pack_lowrank(up, False)
    return sd


# ---- the Flux layout (nunchaku main, ``nunchaku/lora/flux/nunchaku_converter.py`` ``to_nunchaku``) ----------
#: per block kind: nunchaku's W4A4 names -> their diffusers parts (several: q/k/v fused, rows in that order)
FLUX_W4A4 = {
    "transformer_blocks": {
        "qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "qkv_proj_context": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "out_proj": ("attn.to_out.0",), "out_proj_context": ("attn.to_add_out",),
        "mlp_fc1": ("ff.net.0.proj",), "mlp_fc2": ("ff.net.2",),
        "mlp_context_fc1": ("ff_context.net.0.proj",), "mlp_context_fc2": ("ff_context.net.2",)},
    "single_transformer_blocks": {
        "qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"), "mlp_fc1": ("proj_mlp",),
        "out_proj": ("proj_out.linears.0",), "mlp_fc2": ("proj_out.linears.1",)},
}
#: its modulation layers (AWQ, no base branch) and their AdaNorm splits
FLUX_MODULATION = {"transformer_blocks": {"norm1.linear": 6, "norm1_context.linear": 6},
                   "single_transformer_blocks": {"norm.linear": 3}}
SVD_RANK = 32


def flux_base_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{block.name: (in, out)}`` of the W4A4 layers nunchaku's Flux model would have for the
    diffusers Flux ``model`` (fused q/k/v; a single block's ``proj_out`` split by its input)."""
    mods = dict(model.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    for kind, table in FLUX_W4A4.items():
        for i in range(len(getattr(model, kind, []))):
            block = f"{kind}.{i}"
            for name, parts in table.items():
                if parts[0].startswith("proj_out.linears"):
                    out, mlp = mods[f"{block}.proj_out"], mods[f"{block}.proj_mlp"]
                    n1 = out.in_features - mlp.out_features
                    shapes[f"{block}.{name}"] = (n1, out.out_features) if name == "out_proj" else (
                        mlp.out_features, out.out_features)
                elif all(f"{block}.{p}" in mods for p in parts):
                    shapes[f"{block}.{name}"] = (mods[f"{block}.{parts[0]}"].in_features,
                                                 sum(mods[f"{block}.{p}"].out_features for p in parts))
    return shapes


def fake_flux_base(model: nn.Module, rank: int = SVD_RANK, seed: int = 11,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A stand-in for nunchaku's Flux checkpoint's low-rank branches: packed ``{block.name}.lora_down``
    / ``.lora_up`` of rank ``rank`` (random, ``dtype``) on every W4A4 layer, as its checkpoints store them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n_in, n_out) in sorted(flux_base_shapes(model).items()):
        down = torch.randn(rank, n_in, generator=g).to(dtype)
        up = torch.randn(n_out, rank, generator=g).to(dtype)
        sd[f"{name}.lora_down"], sd[f"{name}.lora_up"] = pack_lowrank(down, True), pack_lowrank(up, False)
    return sd


def _fill_missing(parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A q/k/v part the LoRA lacks: the first present part's down and a zero up (as the converter does)."""
    first = next(p for p in parts if p is not None)
    return [p if p is not None else (first[0].clone(), torch.zeros_like(first[1])) for p in parts]


def _pad_rank(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = rank
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _equal_ranks(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], fc1: str, fc2: str) -> None:
    """fc1/fc2 zero-padded to the larger rank of the two (the converter's fc rank equalising)."""
    if fc1 in lora and fc2 in lora:
        rank = max(lora[fc1][0].shape[0], lora[fc2][0].shape[0])
        for n in (fc1, fc2):
            a, b = lora[n]
            lora[n] = (_pad_rank(a, 0, rank), _pad_rank(b, 1, rank))


def to_nunchaku_flux(lora: Mapping[str, Layer], model: nn.Module, base: Mapping[str, torch.Tensor],
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The converted state dict of ``lora`` (``{diffusers Flux module: (A, B, alpha)}``) against
    ``base`` (:func:`fake_flux_base`: its blocks are the file's blocks, its branch goes first on every
    W4A4 layer), as nunchaku's Flux ``to_nunchaku`` writes it: internal names, bare factors, packed,
    the base's dtype where it has a branch (``dtype`` elsewhere), keys outside the blocks as they are."""
    mods = dict(model.named_modules())
    ex = {name: folded(layer) for name, layer in lora.items()}
    sd: dict[str, torch.Tensor] = {}
    for name in sorted(n for n in ex if not _FLUX_BLOCK.match(n)):  # outside the blocks: diffusers names
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = ex[name]
    for b in sorted({".".join(k.split(".")[:2]) for k in base}):
        kind = b.split(".")[0]
        if f"{b}.proj_out" in ex:  # a single block's proj_out split by its input columns, the up copied
            a, up = ex.pop(f"{b}.proj_out")
            n1 = mods[f"{b}.proj_out"].in_features - mods[f"{b}.proj_mlp"].out_features
            ex[f"{b}.proj_out.linears.0"], ex[f"{b}.proj_out.linears.1"] = (a[:, :n1], up.clone()), (a[:, n1:], up.clone())
            _equal_ranks(ex, f"{b}.proj_mlp", f"{b}.proj_out.linears.1")
        _equal_ranks(ex, f"{b}.ff.net.0.proj", f"{b}.ff.net.2")
        _equal_ranks(ex, f"{b}.ff_context.net.0.proj", f"{b}.ff_context.net.2")
        for name, parts in FLUX_W4A4[kind].items():
            found = [ex.get(f"{b}.{p}") for p in parts]
            extra = fuse(_fill_missing(found)) if any(p is not None for p in found) else None
            if f"{b}.{name}.lora_down" not in base:  # a layer the base lacks: the LoRA alone, in ``dtype``
                if extra is None:
                    continue
                down, up = extra[0].to(dtype), extra[1].to(dtype)
            else:
                own = (unpack_lowrank(base[f"{b}.{name}.lora_down"], True),
                       unpack_lowrank(base[f"{b}.{name}.lora_up"], False))
                down, up = own if extra is None else (torch.cat([own[0], extra[0].to(own[0].dtype)], 0),
                                                      torch.cat([own[1], extra[1].to(own[1].dtype)], 1))
            sd[f"{b}.{name}.lora_down"], sd[f"{b}.{name}.lora_up"] = pack_lowrank(down, True), pack_lowrank(up, False)
        for name, splits in FLUX_MODULATION[kind].items():
            if f"{b}.{name}" in ex:
                down, up = (t.to(dtype) for t in ex[f"{b}.{name}"])
                sd[f"{b}.{name}.lora_down"] = rank_padded(down, 0)
                sd[f"{b}.{name}.lora_up"] = rank_padded(interleave(up, splits), 1)
    return sd


_FLUX_BLOCK = re.compile(r"^(?:single_)?transformer_blocks\.\d+\.")
