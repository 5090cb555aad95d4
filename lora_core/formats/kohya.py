"""kohya-ss / sd-scripts: ``<module>.lora_down.weight``, ``lora_up``, ``<module>.alpha``.

Module paths are either dotted (``diffusion_model.transformer_blocks.0.attn.to_q``) or
underscored (``lora_unet_transformer_blocks_0_attn_to_q``); underscored ones are resolved
against the model's module names when the adapter is bound.
"""
from __future__ import annotations

from typing import Iterable

from . import rule

NAME = "kohya"

RULES = (
    rule(r"^(?P<target>.+)\.lora_down\.weight$", "A"),
    rule(r"^(?P<target>.+)\.lora_up\.weight$", "B"),
    rule(r"^(?P<target>.+)\.alpha$", "alpha"),
)


def detect(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys) and not any(
        k.startswith("lycoris_") for k in keys
    )
