"""LoRA files written the way older OneTrainer wrote them for Flux: the ``lora_transformer_`` layout.

Facts from its public code (Nerogar/OneTrainer; read at abfc72fe "add flux model saver",
2024-08-22, and at HEAD 23df383, where the same layout survives as the ``LEGACY`` output:
``modules/util/convert_lora_util.py`` ``convert_to_mixture``, "the historical LoRA output
older OneTrainer versions wrote"; facts, not code):

* Which modules (``modules/modelSetup/FluxLoRASetup.py``, ``modules/module/LoRAModule.py``
  ``LoRAModuleWrapper.__create_modules``): ``LoRAModuleWrapper(model.transformer,
  "lora_transformer", config, config.lora_layers.split(","))`` walks
  ``transformer.named_modules()`` and wraps every ``Linear``/``Conv2d`` whose name contains
  one of the filter words (all of them when the filter is empty). The Flux presets
  (``BaseFluxSetup.LAYER_PRESETS``): ``attn-mlp`` = ``["attn", "ff.net", "proj_mlp"]``,
  ``attn-only`` = ``["attn"]``, ``blocks``, ``full``. Trained text encoders get their own
  wrappers, ``lora_te1`` (CLIP-L, ``text_model.encoder.layers.N.self_attn.q_proj`` ...) and
  ``lora_te2`` (T5, ``encoder.block.N.layer.0.SelfAttention.q`` ...), in the same file.
* Key names: the module is named ``prefix + "_" + module path`` and ``PeftBase.__init__``
  turns its dots into underscores; its ``state_dict(prefix=...)`` gives
  ``<name>.lora_down.weight`` (rank, in), ``<name>.lora_up.weight`` (out, rank) and
  ``<name>.alpha``, a 0-dim buffer (``register_buffer("alpha", torch.tensor(lora_alpha))``).
  So ``lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight``.
* dtype: every tensor, the alphas included, is cast to the output dtype
  (``DtypeModelSaverMixin._convert_state_dict_dtype``: ``value.to(device="cpu", dtype=dtype)``);
  users pick bf16 or fp16 (the default output dtype is float32). Defaults rank 16, alpha 1.0.
* Meaning (``LoRAModule.forward``): ``orig(x) + up(down(x)) * (alpha / rank)``, i.e.
  ``W + m * (alpha / rank) * up @ down`` at strength m, alpha as stored.
* Header (``DtypeModelSaverMixin._create_safetensors_header``, ``ModelSpec.to_dict``,
  ``resources/sd_model_spec/flux_dev_1.0-lora.json``): ``modelspec.sai_model_spec`` "1.0.0",
  ``modelspec.architecture`` "Flux.1-dev/lora", ``modelspec.implementation``
  "https://github.com/huggingface/diffusers", ``modelspec.title`` "FluxDev 1.0 LoRA",
  ``modelspec.date``, ``modelspec.hash_sha256`` ("0x" + sha256 of every tensor's bytes in
  sorted key order), ``ot_branch``, ``ot_revision`` (``ot_config`` only when the config is
  included); no ``ss_network_*`` keys (the kohya header is written for SD/SDXL only).
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import torch
from torch import nn

from lora_core.synthetic import write_safetensors

PRESETS = {"attn-mlp": ("attn", "ff.net", "proj_mlp"), "attn-only": ("attn",), "full": ()}
# a trained CLIP-L (lora_te1) and T5 (lora_te2): module paths and (in, out), as the text encoders name them
TEXT_ENCODER_MODULES = {
    "lora_te1": {"text_model.encoder.layers.0.self_attn.q_proj": (32, 32), "text_model.encoder.layers.0.mlp.fc1": (32, 64)},
    "lora_te2": {"encoder.block.0.layer.0.SelfAttention.q": (32, 32)},
}


def lora_modules(transformer: nn.Module, preset: str = "attn-mlp") -> dict[str, tuple[int, int]]:
    """``{module path: (in, out)}`` of the Linears the wrapper trains with ``preset``'s filter words."""
    words = PRESETS[preset]
    return {name: (m.in_features, m.out_features) for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and (not words or any(w in name for w in words))}


def state_dict(modules: dict[str, tuple[int, int]], *, rank: int = 4, alpha: float = 1.0, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16, text_encoders: bool = False) -> dict[str, torch.Tensor]:
    """The saved tensors: ``lora_transformer_<path with _>`` down/up/alpha, all in ``dtype``
    (lora_up seeded non-zero, as after training; OneTrainer initialises it to zero)."""
    g = torch.Generator().manual_seed(seed)
    named = {f"lora_transformer_{path.replace('.', '_')}": shape for path, shape in modules.items()}
    if text_encoders:
        for prefix, mods in TEXT_ENCODER_MODULES.items():
            named.update({f"{prefix}_{path.replace('.', '_')}": shape for path, shape in mods.items()})
    sd = {}
    for name, (n_in, n_out) in sorted(named.items()):
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, n_in, generator=g) * 0.1).to(dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(n_out, rank, generator=g) * 0.1).to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
    return sd


def header(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    h = hashlib.sha256()
    for tensor in OrderedDict(sorted(sd.items())).values():
        h.update(tensor.contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "Flux.1-dev/lora",
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
            "modelspec.title": "FluxDev 1.0 LoRA", "modelspec.date": "2024-09-01",
            "modelspec.hash_sha256": f"0x{h.hexdigest()}", "ot_branch": "master", "ot_revision": "abfc72fe"}


def write(path: str | os.PathLike, transformer: nn.Module, *, preset: str = "attn-mlp", **kw) -> tuple[str, dict]:
    """Write a Flux LoRA for ``transformer`` as OneTrainer saved it; ``(path, state dict)``."""
    sd = state_dict(lora_modules(transformer, preset), **kw)
    return write_safetensors(path, sd, metadata=header(sd)), sd


def layers(sd: dict[str, torch.Tensor], transformer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module path: (down, up, alpha)}`` of the transformer part, read back by the tool's own
    naming (each module path with dots -> underscores), for the reference."""
    by_flat = {name.replace(".", "_"): name for name, _ in transformer.named_modules()}
    out = {}
    for key, down in sd.items():
        if key.startswith("lora_transformer_") and key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            out[by_flat[name[len("lora_transformer_"):]]] = (down, sd[f"{name}.lora_up.weight"],
                                                             float(sd[f"{name}.alpha"]))
    return out
