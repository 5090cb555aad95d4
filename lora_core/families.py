"""Model-family name maps: other naming conventions -> diffusers module paths.

Qwen-Image, Z-Image and diffusers Flux files already use diffusers names (after the
container prefix is stripped). Black Forest Labs / ComfyUI Flux files use the original
names (``double_blocks.3.img_attn.qkv``), some of which are fused projections that the
diffusers model keeps apart: those expand to several components whose rows are split by
the model's own widths. ComfyUI's native Z-Image (Lumina2 ``NextDiT``) names, as
musubi-tuner's ``convert_z_image_lora_to_comfy.py`` writes them, fuse ``to_q/k/v`` into
``attention.qkv`` (down: the three downs stacked, up: block-diagonal) and call
``to_out.0`` ``attention.out``; ComfyUI's own ``z_image_to_diffusers`` map (``comfy/utils.py``)
adds ``attention.q_norm``/``k_norm`` (diffusers ``norm_q``/``norm_k``) and the top-level
``final_layer.*`` / ``x_embedder`` (diffusers ``all_final_layer.2-1.*`` / ``all_x_embedder.2-1``),
which is where a LoraSave extract of Z-Image puts its ``.diff`` / ``.diff_b`` keys.
Separators may be dots or underscores (kohya). The last reading of any other name is its
underscored (kohya) spelling, which the resolver looks up in the model's unique underscored
names: musubi-tuner's ``convert_lora.py --target other`` turned every ``_`` of a kohya name into
``.`` (``layers.0.attention.to.q``, ``feed.forward.w1``; its fix-up for Z-Image came in 2040335,
2026-01-17, and still leaves ``noise.refiner`` / ``adaLN.modulation``), so those files bind too.

One name can mean different modules in different families (``final_layer.linear`` is Flux's
``proj_out`` and Z-Image's ``all_final_layer.2-1.linear``): :func:`expansions` lists every
reading, and the resolver takes the first that exists in the model. The same map serves
low-rank layers and full-weight diffs (``lora_core.diffs``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Expansion:
    names: tuple[str, ...]  # one: a plain rename; several: B rows split across them in order
    swap_halves: bool = False  # BFL final modulation is (shift, scale); diffusers' is (scale, shift)


_S = r"[._]"
_BFL_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_BFL_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
_BLOCK = re.compile(rf"^(double|single)_blocks{_S}(\d+){_S}(.+)$")
# ComfyUI-native Z-Image: every transformer block family has the same attention names
_ZIMAGE_ATTN = {
    "qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "out": ("attention.to_out.0",),
    "q_norm": ("attention.norm_q",),
    "k_norm": ("attention.norm_k",),
}
_ZIMAGE = re.compile(rf"^(layers|noise_refiner|context_refiner){_S}(\d+){_S}attention{_S}(qkv|out|q_norm|k_norm)$")
# ComfyUI-native Z-Image top-level names (patch size 2, frame patch 1: diffusers' "2-1" entry)
_ZIMAGE_TOP = {
    "final_layer_linear": "all_final_layer.2-1.linear",
    "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "x_embedder": "all_x_embedder.2-1",
}


@lru_cache(maxsize=65536)
def expansions(target: str) -> tuple[Expansion, ...]:
    """Every reading of a file target as diffusers name(s), most likely first; an unknown
    name stands for its underscored spelling (the resolver has already tried it as the
    model's own name; an underscored name it finds in the model's kohya lookup or nowhere)."""
    m = _BLOCK.match(target)
    if m:
        kind, idx, rest = m.group(1), m.group(2), m.group(3).replace(".", "_")
        table, block = (_BFL_DOUBLE, "transformer_blocks") if kind == "double" else (_BFL_SINGLE, "single_transformer_blocks")
        if rest in table:
            return (Expansion(tuple(f"{block}.{idx}.{c}" for c in table[rest])),)
        return (Expansion((target,)),)
    m = _ZIMAGE.match(target)
    if m:
        family, idx, leaf = m.groups()
        return (Expansion(tuple(f"{family}.{idx}.{c}" for c in _ZIMAGE_ATTN[leaf])),)
    flat = target.replace(".", "_")
    out: list[Expansion] = []
    if flat in _BFL_TOP:
        out.append(Expansion((_BFL_TOP[flat],)))
    if flat == "final_layer_adaLN_modulation_1":
        out.append(Expansion(("norm_out.linear",), swap_halves=True))
    if flat in _ZIMAGE_TOP:
        out.append(Expansion((_ZIMAGE_TOP[flat],)))
    return tuple(out) or (Expansion((flat,)),)  # dotted where the model has "_": its kohya spelling


def expand(target: str) -> Expansion:
    """The first reading of :func:`expansions` (kept for callers that want one)."""
    return expansions(target)[0]
