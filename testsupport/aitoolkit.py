"""LoRA files written the way ai-toolkit (ostris/ai-toolkit) writes them, full-weight parts included.

Facts from its public code (read at commit 27a03a9, version 0.12.26; facts, not code):

* Which modules (``toolkit/lora_special.py`` ``LoRASpecialNetwork.create_modules``, l.457-647):
  the network walks the transformer (``target_lora_modules``: the model class, so names start
  at its root) and names each module ``transformer.<module path>``. A ``Linear`` (class names
  Linear, LoRACompatibleLinear, QLinear, OstrisLinear, l.29-35) becomes a ``LoRAModule``
  (``lora_down`` (rank, in), ``lora_up`` (out, rank), no bias). A leaf whose ``weight`` is a
  Parameter becomes a ``FullModule`` instead when its name contains a ``full_if_contains``
  word (Linears too) or, with ``network.all_layers``, when it is no Linear/Conv (norms,
  embeddings; l.504-521). ``FullModule`` (l.148-273) holds ``diff`` shaped like the weight and
  ``diff_b`` like the bias when the module has one (l.187-193). ``ignore_if_contains`` drops a
  name, ``only_if_contains`` keeps only matching ones (l.524, 571, 634), and
  ``network.transformer_only`` (default True, ``toolkit/config_modules.py`` l.202) keeps only
  names containing one of the model's transformer block names (l.531-567): Qwen-Image
  ``transformer_blocks`` (``qwen_image.py`` l.415), Z-Image ``layers`` (``z_image.py`` l.464),
  Flux ``transformer_blocks`` (which single blocks' names contain too).
* Key names (``toolkit/network_mixins.py`` ``get_state_dict`` l.581-639): Flux, SD3, Lumina2
  and every ``is_transformer`` model (Qwen-Image, Z-Image) save in PEFT format (lora_special
  l.422-426): ``lora_down`` -> ``lora_A``, ``lora_up`` -> ``lora_B``, ``.alpha`` dropped, and the
  configured ``linear_alpha`` is replaced by the rank (l.428-433), so the scale is 1. Full
  modules keep ``.diff`` / ``.diff_b`` (their loader, network_mixins l.709-714, reads those
  names back). Qwen-Image and Z-Image then rename ``transformer.`` to ``diffusion_model.``
  (``convert_lora_weights_before_save``, qwen_image.py l.418-423, z_image.py l.467-472); Flux
  (the older ``StableDiffusion`` class, stable_diffusion_model.py l.3138) keeps ``transformer.``.
* dtype: every tensor is cast to ``save.dtype`` (network_mixins l.595), default ``float16``
  (config_modules ``SaveConfig`` l.26; the example configs say float16 too).
* Meaning (FullModule.merge_in l.235-267, LoRAModule merge_in network_mixins l.371-434):
  ``W = cast(float32(W) + m * float32(diff))``, ``b`` likewise with ``diff_b``; a LoRA adds
  ``m * (up @ down) * 1``. A Linear is never both: full_if_contains replaces its LoRA.
* Header (``jobs/process/BaseSDTrainProcess.py`` l.388-409, 522-553; ``toolkit/metadata.py``
  l.13-47; ``info.py``): the config's ``meta`` block (the examples: ``name: "[name]"``,
  ``version: '1.0'``, ``[name]`` replaced by the job name), ``training_info`` (JSON
  ``{"step", "epoch"}``), ``ss_base_model_version`` (``qwen_image``, ``zimage``, ``flux.1``),
  ``ss_output_name`` (the job name), ``ss_tag_frequency`` when there is a trigger word,
  ``software`` (JSON name/repo/version), ``format: "pt"``, then ``sshs_model_hash`` (sha256
  of the bytes after the header of the file saved with only the ``ss_*`` keys) and
  ``sshs_legacy_hash`` (first 8 hex of the sha256 of its bytes 0x100000..0x110000). Every
  non-string value is JSON-encoded; no ``ss_network_alpha`` / ``ss_network_dim``.
* File name: ``<job>_<step zero-padded to 9>.safetensors`` (BaseSDTrainProcess l.517-546).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import safetensors.torch
import torch
from torch import nn

from lora_core.synthetic import write_safetensors

LINEAR_CLASSES = ("Linear", "LoRACompatibleLinear", "QLinear", "OstrisLinear")
CONV_CLASSES = ("Conv2d", "LoRACompatibleConv", "QConv2d")
SOFTWARE = {"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.12.26"}


@dataclass(frozen=True)
class Arch:
    prefix: str  # what the saved keys start with
    blocks: tuple[str, ...]  # transformer block names (transformer_only)
    base_model_version: str  # ss_base_model_version


ARCHS = {
    "qwen_image": Arch("diffusion_model.", ("transformer_blocks",), "qwen_image"),
    "zimage": Arch("diffusion_model.", ("layers",), "zimage"),
    "flux": Arch("transformer.", ("transformer_blocks",), "flux.1"),
}


def network_modules(model: nn.Module, arch: str, *, full_if_contains: Sequence[str] = (), all_layers: bool = False,
                    transformer_only: bool = True, only_if_contains: Sequence[str] | None = None,
                    ignore_if_contains: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(LoRA module paths, full-weight module paths)`` the network would create on ``model``."""
    lora, full = [], []
    for name, m in model.named_modules():
        if not name:
            continue
        clean = f"transformer.{name}"  # ai-toolkit matches words against this and its $$ form
        words = (clean, clean.replace(".", "$$"))
        cls = type(m).__name__
        is_linear, is_conv = cls in LINEAR_CLASSES, cls in CONV_CLASSES
        leaf_with_weight = not list(m.children()) and isinstance(getattr(m, "weight", None), nn.Parameter)
        is_full = leaf_with_weight and (any(w in s for w in full_if_contains for s in words)
                                        or (all_layers and not is_linear and not is_conv))
        if any(w in clean for w in ignore_if_contains):
            continue
        if transformer_only and not any(b in clean for b in ARCHS[arch].blocks):
            continue
        if only_if_contains is not None and not any(w in s for w in only_if_contains for s in words):
            continue
        if is_full:
            full.append(name)
        elif is_linear:  # 1x1 / 3x3 convs need conv settings; none of these transformers has one
            lora.append(name)
    return lora, full


def network_state_dict(model: nn.Module, arch: str, *, rank: int = 4, seed: int = 0,
                       dtype: torch.dtype = torch.float16, lora_scale: float = 0.05, diff_scale: float = 0.02,
                       **select) -> dict[str, torch.Tensor]:
    """The saved state dict of a trained network (random trained values, fp32 cast to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    pre = ARCHS[arch].prefix
    lora, full = network_modules(model, arch, **select)
    sd: dict[str, torch.Tensor] = {}
    for name in lora:
        m = model.get_submodule(name)
        sd[f"{pre}{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) * lora_scale).to(dtype)
        sd[f"{pre}{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * lora_scale).to(dtype)
    for name in full:
        m = model.get_submodule(name)
        sd[f"{pre}{name}.diff"] = (torch.randn(m.weight.shape, generator=g) * diff_scale).to(dtype)
        if getattr(m, "bias", None) is not None:
            sd[f"{pre}{name}.diff_b"] = (torch.randn(m.bias.shape, generator=g) * diff_scale).to(dtype)
    return sd


def save_metadata(sd: dict[str, torch.Tensor], job: str, arch: str, *, step: int = 500, epoch: int = 3,
                  trigger_word: str | None = None, meta: dict | None = None) -> dict[str, str]:
    """The header ai-toolkit writes beside ``sd``."""
    o: dict = dict(meta if meta is not None else {"name": "[name]", "version": "1.0"})
    o["training_info"] = {"step": step, "epoch": epoch}
    o["ss_base_model_version"] = ARCHS[arch].base_model_version
    o["ss_output_name"] = job
    if trigger_word is not None:
        o["ss_tag_frequency"] = {f"1_{trigger_word}": {trigger_word: 1}}
    o = json.loads(json.dumps(o).replace("[name]", job))
    o["software"] = SOFTWARE
    out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in o.items()}
    out["format"] = "pt"
    raw = safetensors.torch.save(sd, {k: v for k, v in out.items() if k.startswith("ss_")})
    n = int.from_bytes(raw[:8], "little")
    out["sshs_model_hash"] = hashlib.sha256(raw[8 + n:]).hexdigest()
    out["sshs_legacy_hash"] = hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    return out


def write_network(directory, model: nn.Module, arch: str, *, job: str = "my_lora_v1", step: int = 500,
                  trigger_word: str | None = None, **kw) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """``(path, state dict, header)`` of ``<job>_<step:09>.safetensors`` in ``directory``."""
    sd = network_state_dict(model, arch, **kw)
    meta = save_metadata(sd, job, arch, step=step, trigger_word=trigger_word)
    path = write_safetensors(f"{directory}/{job}_{step:09d}.safetensors", sd, metadata=meta)
    return path, sd, meta


def tool_merge(w: torch.Tensor, delta32: torch.Tensor, multiplier: float) -> torch.Tensor:
    """ai-toolkit's merge_in of a full module: fp32 copy of w + multiplier * fp32 delta, cast once."""
    return (w.float() + multiplier * delta32.float()).to(w.dtype)


__all__ = ["ARCHS", "Arch", "network_modules", "network_state_dict", "save_metadata", "write_network", "tool_merge"]
