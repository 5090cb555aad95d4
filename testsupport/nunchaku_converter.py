"""A nunchaku-converted Qwen-Image LoRA, written the way nunchaku's converter writes one.

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
