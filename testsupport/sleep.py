"""A fake backend for measurement: renders by sleeping, composes by sleeping.

Spec::

    {"backend": "sleep", "render_s": R, "compose_s": C}          # optional: load_s, image_size, realistic

* **A render costs R seconds per image.** ``render(batch)`` sleeps ``R * len(batch)`` once
  and returns one small solid-colour PIL image per request (``image_size`` pixels square,
  8 by default; the requested width/height are ignored so PNG encoding stays negligible).
  The colour is a fixed function of the request's seed: same seed, same bytes.
* **A switch costs C seconds.** :class:`workers.wrapper.ComposedModel` calls
  ``reset_step_cache()`` exactly once per composition switch (``ensure`` with a changed
  key), and never otherwise; this backend sleeps ``C`` there. So the farm's real
  composition code still runs (files are fetched, bound and merged into ``transformer``)
  and each switch additionally costs C seconds, as a large model's merge would.
  ``switches`` counts the calls.
* ``R = 0, C = 0`` (the defaults) is a no-op backend: no sleep call at all, for measuring
  the farm's own overhead.
* **A load costs L seconds** (``load_s``, 0 by default): building the backend sleeps that
  long once, as loading a real model's weights would (tens of seconds), for benchmarks of
  what a model load costs the farm.
* **Realistic images** (``realistic: true``, off by default): instead of a solid colour, a
  smooth gradient in the seed's colour plus mild per-pixel noise drawn from the seed, so PNG
  encoding costs about what a real render's does (``image_size: 1328`` for Qwen-Image's
  size). Still deterministic in the seed. Making the image counts towards R: the render
  sleeps only what is left of ``R * len(batch)`` afterwards.

``transformer`` is a small ``nn.Module`` tree whose ``nn.Linear`` layers carry Qwen-Image's
names (``transformer_blocks.{i}.attn.to_q|to_k|to_v|to_out.0``,
``transformer_blocks.{i}.img_mlp.net.0.proj|net.2``), ``dim`` wide (32), ``layers`` blocks
(2), weights drawn from ``seed``: real LoRA files written against
:func:`sleep_transformer_shapes` bind to it and merge for real. Its forward is never called.

Not a manifest backend (``jobs.validate`` does not list it): importing this module
registers ``"sleep"`` in :mod:`workers.backends.registry` for this process, so tests and
benchmarks build ``Manifest`` objects or ``RenderWorker``s with this spec directly. A Ray
actor is another process: give its ``RenderWorker`` ``backend_factory=make_sleep_backend``.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import nn

from workers.backends import register_backend
from workers.backends.base import COMMON_KEYS, BackendSpecError, RenderRequest, check_spec, resolve_device, resolve_dtype

#: The nn.Linear leaves of one block, relative to ``transformer_blocks.{i}``.
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2")


def build_sleep_transformer(dim: int = 32, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A module tree with Qwen-Image's linear names (see the module docstring); deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def linear(n_in: int, n_out: int) -> nn.Linear:
        lin = nn.Linear(n_in, n_out, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_((torch.rand(n_out, n_in, generator=g) * 2 - 1) / n_in**0.5)
            lin.bias.copy_((torch.rand(n_out, generator=g) * 2 - 1) / n_in**0.5)
        return lin

    root = nn.Module()
    root.transformer_blocks = nn.ModuleList()
    for _ in range(layers):
        blk = nn.Module()
        blk.attn = nn.Module()
        blk.attn.to_q, blk.attn.to_k, blk.attn.to_v = linear(dim, dim), linear(dim, dim), linear(dim, dim)
        blk.attn.to_out = nn.ModuleList([linear(dim, dim)])
        ff = nn.Module()
        ff.net = nn.ModuleList([nn.Module(), nn.GELU(), linear(4 * dim, dim)])
        ff.net[0].proj = linear(dim, 4 * dim)
        blk.img_mlp = ff
        root.transformer_blocks.append(blk)
    return root.eval().requires_grad_(False)


def sleep_transformer_shapes(dim: int = 32, layers: int = 2, include: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of the sleep transformer's linears (``lora_core.synthetic.linear_shapes`` form)."""
    shapes = {}
    for i in range(layers):
        for leaf in BLOCK_LINEARS:
            name = f"transformer_blocks.{i}.{leaf}"
            if include and not any(s in name for s in include):
                continue
            n_in = 4 * dim if leaf == "img_mlp.net.2" else dim
            n_out = 4 * dim if leaf == "img_mlp.net.0.proj" else dim
            shapes[name] = (n_in, n_out)
    return shapes


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A fixed RGB colour per seed (a 32-bit integer hash, so nearby seeds differ)."""
    x = (int(seed) * 2654435761 + 0x9E3779B9) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    x ^= x >> 16
    return (x & 0xFF, (x >> 8) & 0xFF, (x >> 16) & 0xFF)


#: Half-width of the realistic images' per-pixel noise, in 8-bit levels: mild enough to look
#: like grain, enough that zlib works as hard as on a real render's (a few MB at 1328 px).
REALISTIC_NOISE = 8


def realistic_image(seed: int, size: int):
    """A ``size``-pixel square RGB image: a smooth gradient in the seed's colour plus mild
    noise drawn from the seed, so it compresses like a real render, not like a flat colour."""
    import numpy as np
    from PIL import Image

    r, g, b = seed_colour(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    y, x = ramp[:, None], ramp[None, :]
    ones = np.ones((size, size), dtype=np.float32)
    base = np.stack([r * (0.35 + 0.65 * x) * ones, g * (1.0 - 0.6 * y) * ones, 40 + (b * 0.8) * (x * y)], axis=-1)
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFF)
    noise = rng.integers(-REALISTIC_NOISE, REALISTIC_NOISE + 1, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


class SleepBackend:
    """See the module docstring: render sleeps R per image, a switch sleeps C."""

    KEYS = COMMON_KEYS | {"render_s", "compose_s", "load_s", "dim", "layers", "seed", "image_size", "realistic"}

    def __init__(self, render_s: float = 0.0, compose_s: float = 0.0, *, dim: int = 32, layers: int = 2, seed: int = 0,
                 image_size: int = 8, load_s: float = 0.0, realistic: bool = False,
                 device: str | torch.device | None = "cpu", dtype: torch.dtype = torch.float32):
        if render_s < 0 or compose_s < 0 or load_s < 0:
            raise BackendSpecError([f"render_s/compose_s/load_s: must be >= 0, got {render_s!r}/{compose_s!r}/{load_s!r}"])
        self.name = "sleep"
        self.render_s = float(render_s)
        self.compose_s = float(compose_s)
        self.load_s = float(load_s)
        self.realistic = bool(realistic)
        self.image_size = max(1, int(image_size))
        if self.load_s > 0:  # a real model's weights coming off disk onto the device
            time.sleep(self.load_s)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.transformer = build_sleep_transformer(int(dim), int(layers), int(seed), dtype).to(self.device)
        self.switches = 0  # reset_step_cache calls = composition switches under ComposedModel
        self.rendered = 0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None = None, device: str | torch.device | None = None) -> "SleepBackend":
        spec = dict(spec or {"backend": "sleep"})
        check_spec(spec, cls.KEYS)  # step_cache / rope are accepted (common keys) and have nothing to act on
        problems = []
        values: dict[str, float] = {}
        for key in ("render_s", "compose_s", "load_s"):
            raw = spec.get(key, 0.0)
            try:
                values[key] = float(raw)
            except (TypeError, ValueError):
                problems.append(f"{key}: must be a number of seconds, got {raw!r}")
                continue
            if not values[key] >= 0:  # also NaN
                problems.append(f"{key}: must be >= 0, got {raw!r}")
        realistic = spec.get("realistic", False)
        if not isinstance(realistic, bool):
            problems.append(f"realistic: must be true or false, got {realistic!r}")
        if problems:
            raise BackendSpecError(problems)
        dev = resolve_device(device)
        return cls(values["render_s"], values["compose_s"], dim=int(spec.get("dim", 32)), layers=int(spec.get("layers", 2)),
                   seed=int(spec.get("seed", 0)), image_size=int(spec.get("image_size", 8)), load_s=values["load_s"],
                   realistic=realistic, device=dev, dtype=resolve_dtype(spec.get("dtype") or "float32", dev))

    # ---- the Backend protocol -------------------------------------------------------------
    def render(self, batch: list[RenderRequest]) -> list[Any]:
        """Sleep R per image (one sleep for the batch), then one solid-colour image per request
        (``realistic``: one gradient-plus-noise image each, made first, within the R)."""
        from PIL import Image

        if self.realistic:
            t0 = time.perf_counter()
            images = [realistic_image(r.seed, self.image_size) for r in batch]
            left = self.render_s * len(batch) - (time.perf_counter() - t0)
            if left > 0:
                time.sleep(left)
            self.rendered += len(batch)
            return images
        if self.render_s > 0 and batch:
            time.sleep(self.render_s * len(batch))
        self.rendered += len(batch)
        size = (self.image_size, self.image_size)
        return [Image.new("RGB", size, seed_colour(r.seed)) for r in batch]

    def reset_step_cache(self) -> None:
        """Called once per composition switch by ComposedModel.ensure: a switch costs C seconds."""
        self.switches += 1
        if self.compose_s > 0:
            time.sleep(self.compose_s)

    def to(self, device: str | torch.device) -> "SleepBackend":
        self.device = torch.device(device)
        self.transformer.to(self.device)
        return self


def make_sleep_backend(spec: Mapping[str, Any] | None = None, device: str | torch.device | None = None) -> SleepBackend:
    """The registry's factory for ``"sleep"``; a module-level function so it pickles by reference."""
    return SleepBackend.from_spec(spec, device=device)


register_backend("sleep", make_sleep_backend)
