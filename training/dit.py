"""Train the tiny Qwen-Image transformer (the real ``QwenImageTransformer2DModel`` at
``TINY_TRANSFORMER_CONFIG``) by flow matching on the trained VAE's latents of the
procedural pictures, conditioned on the frozen tiny text encoder's embedding of each
picture's prompt.

Flow matching as diffusers' ``FlowMatchEulerDiscreteScheduler`` integrates it: the noised
latent is ``x_t = (1 - s) x_0 + s e`` at noise level ``s`` (the transformer's timestep input
is ``s``, the pipeline passes ``t / 1000``), and the transformer predicts the velocity
``e - x_0``. Noise levels are drawn logit-normal (as SD3 / Qwen-Image train), and the weights
kept for rendering are an exponential moving average of the trained ones.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch

from . import shapes
from .common import Curve

EMA_DECAY = 0.998


@torch.no_grad()
def prompt_table(pipe: Any, prompts: list[str]) -> tuple[dict[str, int], torch.Tensor]:
    """Each prompt's row in one (n, L, D) table of the pipeline's own prompt embeddings (the
    prompts are built to have the same token count, so no padding is needed)."""
    emb, mask = pipe.encode_prompt(prompts, device="cpu")[:2]
    if mask is not None and not bool(mask.all()):
        raise ValueError("prompts of the dataset must encode to the same number of tokens")
    return {p: i for i, p in enumerate(prompts)}, emb.float()


@torch.no_grad()
def encode_latents(pipe: Any, pictures: list[shapes.Picture], effect: str | None = None,
                   batch: int = 32) -> torch.Tensor:
    """Packed, normalised latents (n, tokens, 64) of the pictures: what the transformer sees."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    out = []
    for i in range(0, len(pictures), batch):
        x = shapes.batch(pictures[i:i + batch], effect).unsqueeze(2)
        z = (vae.encode(x).latent_dist.mean - mean) / std
        b, c, _, h, w = z.shape
        out.append(pipe._pack_latents(z, b, c, h, w))
    return torch.cat(out)


def velocity_loss(transformer: torch.nn.Module, x0: torch.Tensor, emb: torch.Tensor,
                  generator: torch.Generator, noise_bias: float = 0.0) -> torch.Tensor:
    """The flow-matching loss of one batch (x0: packed latents, emb: prompt embeddings)."""
    b, n, _ = x0.shape
    side = int(math.isqrt(n))
    s = torch.sigmoid(torch.randn(b, generator=generator) + noise_bias)
    noise = torch.randn(x0.shape, generator=generator)
    xt = (1 - s.view(b, 1, 1)) * x0 + s.view(b, 1, 1) * noise
    pred = transformer(hidden_states=xt, encoder_hidden_states=emb,
                       encoder_hidden_states_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                       timestep=s, img_shapes=[[(1, side, side)]] * b, return_dict=False)[0]
    return (pred.float() - (noise - x0)).pow(2).mean()


def fit(module: torch.nn.Module, params: list[torch.nn.Parameter], latents: torch.Tensor, rows: torch.Tensor,
        table: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, name: str,
        ema: torch.nn.Module | None = None, noise_bias: float = 0.0, log: Callable[[str], None] = print) -> Curve:
    """Flow-matching steps on (latents[i], table[rows[i]]) pairs; ``params`` are trained
    (the whole transformer, or a LoRA's factors), ``ema`` (a copy) follows them if given."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve = Curve(name)
    t0 = time.perf_counter()
    module.train()
    warm = max(1, steps // 20)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(len(latents), (batch,), generator=gen)
        loss = velocity_loss(module, latents[pick], table[rows[pick]], gen, noise_bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), module.parameters()):
                    pe.lerp_(p, 1 - EMA_DECAY)
        curve.add(step, float(loss.detach()))
        if step % 200 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)")
    curve.seconds = time.perf_counter() - t0
    module.eval()
    return curve


def train_transformer(pipe: Any, seed: int = 0, pictures: int = 4096, steps: int = 3000, batch: int = 32,
                      lr: float = 1e-3, log: Callable[[str], None] = print) -> tuple[torch.nn.Module, Curve]:
    """Train ``pipe.transformer`` (its VAE already trained) and return the EMA weights' copy."""
    gen = torch.Generator().manual_seed(seed + 21)
    pics = shapes.sample_pictures(pictures, gen)
    index, table = prompt_table(pipe, shapes.all_prompts())
    t0 = time.perf_counter()
    latents = encode_latents(pipe, pics)
    log(f"encoded {len(pics)} pictures in {time.perf_counter() - t0:.0f} s")
    rows = torch.tensor([index[p.prompt] for p in pics])
    transformer = pipe.transformer
    transformer.requires_grad_(True)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    curve = fit(transformer, list(transformer.parameters()), latents, rows, table, steps=steps, batch=batch,
                lr=lr, seed=seed + 22, name="transformer", ema=ema, log=log)
    return ema.eval(), curve
