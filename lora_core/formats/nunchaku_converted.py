"""nunchaku's own converted LoRA files (``nunchaku.lora.flux.to_nunchaku`` output), refused by name.

That converter writes the quantized model's internal names (``transformer_blocks.N.qkv_proj``,
``mlp_fc1``, ``mlp_context_fc2``, ``out_proj_context`` ...) with bare ``.lora_down`` /
``.lora_up`` tensors that are (1) permuted into the W4A4 kernel's tile order, (2) already
concatenated with the base checkpoint's own SVD low-rank branch (rank 32 of *that* exact
checkpoint), with alpha folded in, and (3) meant to *replace* the
layer's ``proj_down``/``proj_up`` wholesale. Reading one back as an additive update would
mean subtracting a branch we cannot check belongs to the model in hand, so lora_core
refuses it and asks for the original file, which it packs onto the SVDQ branch itself
(``lora_core/nunchaku.py``). Loading such files is out of scope: the refusal by name is
the decision.

Any bare ``.lora_down``/``.lora_up`` key marks it, whatever the module: besides the Flux
leaves above, converters for other nunchaku models (a fork's Qwen-Image one writes
``transformer_blocks.0.attn.to_qkv.lora_down``, ``img_mod.1.lora_down``) keep the model's
own names. No scheme we read accepts a bare suffix (kohya and LyCORIS end in
``.lora_down.weight``, PEFT in ``.lora_A[.name].weight``), so no loadable file is refused by this.
"""
from __future__ import annotations

import re
from typing import Iterable

NAME = "nunchaku-converted"

# nunchaku's internal module leaves, as its Flux converter's local_name_map writes them
_LEAF = re.compile(r"(?:^|\.)(?:qkv_proj(?:_context)?|out_proj(?:_context)?|mlp(?:_context)?_fc[12])\.lora_(?:down|up)$")
# any bare factor: what no scheme reads (``.lora_down.weight`` is kohya's)
_BARE = re.compile(r"(?:^|\.)lora_(?:down|up)$")


def detect(keys: Iterable[str]) -> str | None:
    """The key that marks a nunchaku-converted file (the first on one of nunchaku's own Flux
    leaves, else the first bare ``lora_down``/``lora_up``), or None."""
    bare = [key for key in keys if _BARE.search(key)]
    return next((key for key in bare if _LEAF.search(key)), bare[0] if bare else None)


def message(key: str) -> str:
    return (f"unsupported adapter format: nunchaku-converted LoRA (key {key!r}): its tensors are packed for the "
            "W4A4 kernel and carry one base checkpoint's own SVD branch; use the original LoRA file "
            "(lora_core packs it onto the SVDQ branch itself)")
