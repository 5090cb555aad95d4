"""RoPE scaling for resolutions the model was not trained at.

Rendering far above the training resolution gives the transformer rotary positions it has
never seen, and the early (high-noise) steps, which lay out the global composition, turn
that into repeated subjects and broken layouts. We use *position interpolation* (Chen et
al., 2023): every position p is read as p / factor, so a 2x larger latent grid spans the
position range of the training grid. Interpolation (rather than NTK, which rescales the
frequency base) keeps the lowest frequencies, the ones that carry global layout, inside
their trained range, which is exactly what the early steps need. Later steps refine local
detail, where interpolated positions would blur high frequencies, so scaling is applied
only while the timestep is above ``timestep_threshold`` and the original embedding is
used below it.

Timesteps are read normalized to [0, 1] (1 = pure noise): Qwen-Image and Flux pipelines
already pass ``t / 1000``; a value above 1.5 is taken as 0..1000 scheduler units and
divided by 1000 (UNet-style models).

Supported position embedders: diffusers' Qwen-Image family (``QwenEmbedRope``,
``QwenEmbedLayer3DRope``: precomputed ``pos_freqs``/``neg_freqs`` tables) and Flux-style
embedders that take position ``ids`` (``FluxPosEmbed``). Anything else is a clear error.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .stepcache import read_timestep


def normalized_timestep(t: float | None) -> float | None:
    if t is None:
        return None
    return t / 1000.0 if t > 1.5 else t


def _scaled_table_embedder(orig: torch.nn.Module, factor: float) -> torch.nn.Module:
    """A copy of a Qwen-style embedder whose frequency tables hold positions / factor."""
    scaled = type(orig)(theta=orig.theta, axes_dim=list(orig.axes_dim), scale_rope=orig.scale_rope)
    n = orig.pos_freqs.shape[0]
    # Same integer index tensors as diffusers builds, divided in fp32: factor 1 is bit-identical.
    pos_index = torch.arange(n).to(torch.float32) / factor
    neg_index = (torch.arange(n).flip(0) * -1 - 1).to(torch.float32) / factor
    scaled.pos_freqs = torch.cat([orig.rope_params(pos_index, d, orig.theta) for d in orig.axes_dim], dim=1)
    scaled.neg_freqs = torch.cat([orig.rope_params(neg_index, d, orig.theta) for d in orig.axes_dim], dim=1)
    return scaled


class RopeScaling:
    """Position interpolation by ``factor`` while the normalized timestep is above ``timestep_threshold``."""

    def __init__(self, factor: float = 1.0, timestep_threshold: float = 0.0):
        problems = []
        if not factor > 0:
            problems.append(f"factor: must be > 0, got {factor}")
        if not 0.0 <= timestep_threshold <= 1.0:
            problems.append(f"timestep_threshold: must be in [0, 1] (normalized timestep), got {timestep_threshold}")
        if problems:
            raise ValueError("bad rope settings: " + "; ".join(problems))
        self.factor = float(factor)
        self.timestep_threshold = float(timestep_threshold)
        self.active = False  # whether the current call uses scaled positions
        self._embedder: torch.nn.Module | None = None
        self._had_own_forward = False
        self._original: Callable | None = None
        self._hook = None

    @property
    def enabled(self) -> bool:
        return self.factor != 1.0

    def attach(self, transformer: torch.nn.Module) -> "RopeScaling":
        if self._embedder is not None:
            raise RuntimeError("this RopeScaling is already attached; detach() it first")
        embedder = getattr(transformer, "pos_embed", None)
        if embedder is None:
            raise NotImplementedError(f"RoPE scaling: {type(transformer).__name__} has no pos_embed")
        self._original = embedder.forward
        self._had_own_forward = "forward" in vars(embedder)
        embedder.forward = self._make_forward(embedder)
        self._embedder = embedder
        # The pos_embed call does not see the timestep; the transformer's call does.
        self._hook = transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._embedder is None:
            return
        if self._had_own_forward:
            self._embedder.forward = self._original
        else:
            del self._embedder.forward
        self._hook.remove()
        self._embedder = self._original = self._hook = None
        self.active = False

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = normalized_timestep(read_timestep(args, kwargs))
        self.active = t is not None and t > self.timestep_threshold

    def _make_forward(self, embedder: torch.nn.Module) -> Callable[..., Any]:
        original = embedder.forward
        if all(hasattr(embedder, a) for a in ("pos_freqs", "neg_freqs", "rope_params", "axes_dim")):
            scaled = _scaled_table_embedder(embedder, self.factor)

            def forward(*args, **kwargs):
                return scaled(*args, **kwargs) if self.active else original(*args, **kwargs)

            return forward
        if type(embedder).__name__ == "FluxPosEmbed":

            def forward_ids(ids: torch.Tensor, *args, **kwargs):
                if self.active:
                    ids = ids.float() / self.factor
                return original(ids, *args, **kwargs)

            return forward_ids
        raise NotImplementedError(f"RoPE scaling does not know the position embedder {type(embedder).__name__}")


def rope_from_spec(spec: dict | None) -> RopeScaling | None:
    """``{"factor": 2.0, "timestep_threshold": 0.9}``; None, ``{}`` or factor 1 mean off."""
    if not spec:
        return None
    unknown = sorted(set(spec) - {"factor", "timestep_threshold"})
    if unknown:
        raise ValueError(f"rope: unknown keys {unknown} (allowed: ['factor', 'timestep_threshold'])")
    rope = RopeScaling(float(spec.get("factor", 1.0)), float(spec.get("timestep_threshold", 0.0)))
    return rope if rope.enabled else None
