"""Random LoRA files that fit a given model, in the key schemes found in the wild.

Used by the demo (LoRAs for the tiny model, written against
``workers.backends.tiny.TINY_TRANSFORMER_CONFIG``), by outside tools that need LoRAs that
bind to a model, and by the tests and benchmarks (through :mod:`testsupport.lora`).

A LoRA here is ``{module name: (A (r, in), B (out, r), alpha)}``; :func:`peft_state_dict`
and :func:`kohya_state_dict` turn it into the state dict of a real file.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors.torch import save_file
from torch import nn

Layer = tuple[torch.Tensor, torch.Tensor, float]  # (A (r,in), B (out,r), alpha)


def linear_shapes(module: nn.Module, include: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """{name: (in, out)} of the nn.Linear layers whose name contains any of ``include``."""
    return {
        n: (m.in_features, m.out_features)
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and (not include or any(s in n for s in include))
    }


def random_layers(shapes: Mapping[str, tuple[int, int]], rank: int = 4, seed: int = 0, alpha: float | None = None,
                  scale: float = 0.05, dtype: torch.dtype = torch.float32) -> dict[str, Layer]:
    """Seeded random (A, B, alpha) factors for each ``{name: (in, out)}``; same seed, same factors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n_in, n_out) in sorted(shapes.items()):
        a = (torch.randn(rank, n_in, generator=g) * scale).to(dtype)
        b = (torch.randn(n_out, rank, generator=g) * scale).to(dtype)
        out[name] = (a, b, float(alpha if alpha is not None else rank))
    return out


def peft_state_dict(layers: Mapping[str, Layer], prefix: str = "transformer.", adapter: str | None = None,
                    with_alpha: bool = True) -> dict[str, torch.Tensor]:
    """PEFT / diffusers keys: ``{prefix}{name}.lora_A[.{adapter}].weight`` and ``lora_B``."""
    mid = f".{adapter}" if adapter else ""
    sd = {}
    for name, (a, b, alpha) in layers.items():
        sd[f"{prefix}{name}.lora_A{mid}.weight"] = a.contiguous()
        sd[f"{prefix}{name}.lora_B{mid}.weight"] = b.contiguous()
        if with_alpha:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return sd


def kohya_state_dict(layers: Mapping[str, Layer], prefix: str = "lora_unet_", underscored: bool = True) -> dict[str, torch.Tensor]:
    """kohya keys: ``{prefix}{name with _ for .}.lora_down.weight`` / ``lora_up`` / ``alpha``."""
    sd = {}
    for name, (a, b, alpha) in layers.items():
        stem = prefix + (name.replace(".", "_") if underscored else name)
        sd[f"{stem}.lora_down.weight"] = a.contiguous()
        sd[f"{stem}.lora_up.weight"] = b.contiguous()
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def comfy_extract_state_dict(layers: Mapping[str, Layer], diffs: Mapping[str, Mapping[str, torch.Tensor]],
                             prefix: str = "diffusion_model.", dtype: torch.dtype = torch.float16
                             ) -> dict[str, torch.Tensor]:
    """ComfyUI "LoraSave" (``comfy_extras/nodes_lora_extract.py``) keys: ``{prefix}{module}.lora_up.weight``
    / ``lora_down.weight`` for 2-D weights (no alpha tensor: the loader takes alpha = rank),
    ``{prefix}{module}.diff`` for a whole-weight delta (weights under 2-D with ``bias_diff``, on by
    default; every weight in its ``full_diff`` type) and ``.diff_b`` for a bias delta (``diffs``:
    ``{module: {"weight"|"bias": delta}}``). The node stores everything in fp16 (``.half()``)."""
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    sd = {}
    for name, (a, b, _alpha) in layers.items():
        sd[f"{prefix}{name}.lora_up.weight"] = cast(b)
        sd[f"{prefix}{name}.lora_down.weight"] = cast(a)
    for name, params in diffs.items():
        for param, t in params.items():
            sd[f"{prefix}{name}.{'diff' if param == 'weight' else 'diff_b'}"] = cast(t)
    return sd


def write_safetensors(path: str | os.PathLike, sd: Mapping[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write ``sd`` as a safetensors file at ``path``; returns the path as a string."""
    path = os.fspath(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


__all__ = ["Layer", "linear_shapes", "random_layers", "peft_state_dict", "kohya_state_dict", "comfy_extract_state_dict",
           "write_safetensors"]
