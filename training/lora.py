"""Train the demo LoRAs on the trained tiny transformer: each one a low-rank update
``W + (alpha / r) B A`` of some of its linear layers, trained by flow matching on one
effect's pictures (:data:`training.shapes.EFFECTS`), everything else frozen.

The factors are written in the key schemes of real files (PEFT / diffusers and kohya), so
the demo loads them the way it loads LoRAs from the wild.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import shapes
from .common import Curve
from .dit import encode_latents, fit, prompt_table


@dataclass(frozen=True)
class LoraSpec:
    effect: str  # one of shapes.EFFECTS
    kind: str  # what the demo calls it: style, detail, character
    scheme: str  # "peft" or "kohya"
    include: tuple[str, ...]  # substrings of the module names it trains
    rank: int
    #: where its training draws noise levels: logit-normal with this location (0: centred). A
    #: style that recolours the whole picture acts where the colours are decided, at high noise:
    #: trained centred, the palette LoRA half-learned its colours (measure 0.33 of 1, muddy).
    noise_bias: float = 0.0


DEMO_LORAS: dict[str, LoraSpec] = {
    "palette": LoraSpec("palette", "style", "peft", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                                      "img_mlp.net.0.proj", "img_mlp.net.2"), 8, noise_bias=1.0),
    "stripes": LoraSpec("stripes", "detail", "kohya", ("attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2"), 8),
    "snowman": LoraSpec("snowman", "character", "peft", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                                          "img_mlp.net.0.proj", "img_mlp.net.2"), 8),
}


class LowRank(nn.Module):
    """A trainable update beside a frozen ``nn.Linear`` (added by a forward hook)."""

    def __init__(self, linear: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        bound = 1.0 / math.sqrt(linear.in_features)
        self.down = nn.Parameter((torch.rand(rank, linear.in_features, generator=generator) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.zeros(linear.out_features, rank))  # a no-op at the start
        self.handle = linear.register_forward_hook(self._add)

    def _add(self, _module, inputs, output):
        return output + (inputs[0] @ self.down.T) @ self.up.T


def attach(transformer: nn.Module, spec: LoraSpec, seed: int) -> dict[str, LowRank]:
    gen = torch.Generator().manual_seed(seed)
    return {name: LowRank(m, spec.rank, gen) for name, m in sorted(transformer.named_modules())
            if isinstance(m, nn.Linear) and any(s in name for s in spec.include)}


def state_dict_of(layers: dict[str, LowRank], spec: LoraSpec, dtype: torch.dtype = torch.float16) -> dict:
    from lora_core import synthetic as S

    # alpha = rank: the update is B A exactly as trained
    factors = {n: (l.down.detach().to(dtype), l.up.detach().to(dtype), float(spec.rank)) for n, l in layers.items()}
    if spec.scheme == "kohya":
        return S.kohya_state_dict(factors, prefix="lora_unet_")
    return S.peft_state_dict(factors)


def train_lora(pipe: Any, name: str, seed: int = 0, pictures: int = 1024, steps: int = 600, batch: int = 16,
               lr: float = 2e-3, noise_bias: float = 0.0, log: Callable[[str], None] = print) -> tuple[dict, Curve]:
    """Train LoRA ``name`` of :data:`DEMO_LORAS` on ``pipe.transformer`` (left as it was) and
    return its state dict (fp16, in the spec's key scheme) and loss curve."""
    spec = DEMO_LORAS[name]
    gen = torch.Generator().manual_seed(seed + 31 + shapes.EFFECTS.index(spec.effect))
    pics = shapes.sample_pictures(pictures, gen)
    index, table = prompt_table(pipe, shapes.all_prompts())
    latents = encode_latents(pipe, pics, spec.effect)
    rows = torch.tensor([index[p.prompt] for p in pics])
    transformer = pipe.transformer.requires_grad_(False)
    layers = attach(transformer, spec, seed + 41)
    try:
        params = [p for layer in layers.values() for p in layer.parameters()]
        curve = fit(transformer, params, latents, rows, table, steps=steps, batch=batch, lr=lr,
                    seed=seed + 51, name=f"lora {name}", noise_bias=noise_bias, log=log)
    finally:
        for layer in layers.values():
            layer.handle.remove()
    return state_dict_of(layers, spec), curve
