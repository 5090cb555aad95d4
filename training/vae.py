"""Train the tiny Qwen-Image VAE (``AutoencoderKLQwenImage``, the real class at
``TINY_VAE_CONFIG``) as an autoencoder on the procedural pictures, every effect included
(the LoRAs change the transformer only, so the VAE must draw what they ask for).

Crops of the pictures keep a step cheap on a CPU: the VAE is convolutional, so what it
learns on a crop holds on the whole picture. The loss is L1 + MSE on the reconstruction of
a posterior sample plus a small KL term (as Stable Diffusion's VAE), so that the latent
space stays smooth for the transformer.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch

from . import shapes
from .common import Curve, seeded

KL_WEIGHT = 1e-6
#: Share of the pictures drawn with each effect while the VAE learns (the rest plain).
EFFECT_SHARE = 0.5


def build_vae(seed: int, latents_mean=None, latents_std=None) -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    from workers.backends.tiny import TINY_VAE_CONFIG

    cfg = copy.deepcopy(TINY_VAE_CONFIG)
    if latents_mean is not None:
        cfg.update(latents_mean=list(latents_mean), latents_std=list(latents_std))
    with seeded(seed):
        return AutoencoderKLQwenImage(**cfg)


def picture_batch(n: int, generator: torch.Generator, crop: int) -> torch.Tensor:
    """(n, 3, 1, crop, crop) in [-1, 1]: pictures, a share with an effect, cropped at random."""
    pics = shapes.sample_pictures(n, generator)
    effects = torch.rand(n, generator=generator)
    which = torch.randint(len(shapes.EFFECTS), (n,), generator=generator)
    imgs = torch.stack([shapes.draw(p, shapes.EFFECTS[int(w)] if e < EFFECT_SHARE else None)
                        for p, e, w in zip(pics, effects, which)]) * 2 - 1
    if crop < shapes.SIZE:
        ox, oy = (torch.randint(0, shapes.SIZE - crop + 1, (2, n), generator=generator) // 8) * 8
        imgs = torch.stack([im[:, y:y + crop, x:x + crop] for im, x, y in zip(imgs, ox.tolist(), oy.tolist())])
    return imgs.unsqueeze(2)


def train_vae(seed: int = 0, steps: int = 1600, batch: int = 8, crop: int = 64, lr: float = 1e-3,
              log: Callable[[str], None] = print) -> tuple[torch.nn.Module, Curve]:
    vae = build_vae(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 11)
    sample_gen = torch.Generator().manual_seed(seed + 12)
    curve = Curve("vae")
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay after a short warm-up
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = picture_batch(batch, gen, crop)
        dist = vae.encode(x).latent_dist
        # a posterior sample whose noise grows in over the first half: the decoder first
        # learns colours and edges from the mean, then to be robust around it
        z = dist.mean + min(1.0, 2 * step / steps) * dist.std * torch.randn(dist.mean.shape, generator=sample_gen)
        y = vae.decode(z).sample
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        loss = rec + KL_WEIGHT * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        curve.add(step, float(rec.detach()))
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} recon {float(rec):.4f} ({time.perf_counter() - t0:.0f} s)")
    curve.seconds = time.perf_counter() - t0
    vae.eval()
    return vae, curve


@torch.no_grad()
def latent_stats(vae: torch.nn.Module, seed: int, n: int = 256, batch: int = 32) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of ``n`` whole plain pictures: the
    pipeline's ``latents_mean`` / ``latents_std`` (it decodes ``z * std + mean``)."""
    gen = torch.Generator().manual_seed(seed + 13)
    zs = [vae.encode(shapes.batch(shapes.sample_pictures(batch, gen)).unsqueeze(2)).latent_dist.mean
          for _ in range(max(1, n // batch))]
    z = torch.cat(zs).transpose(0, 1).reshape(zs[0].shape[1], -1)
    return [round(float(v), 5) for v in z.mean(1)], [round(float(v), 5) for v in z.std(1).clamp_min(1e-3)]
