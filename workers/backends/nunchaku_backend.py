"""Nunchaku-quantized Qwen-Image (SVDQuant W4A4 transformer), when nunchaku is installed.

nunchaku is not on PyPI: a PyPI package of that name is an unrelated project, so "import
nunchaku works" is not enough. We accept the install only if it has the class we load,
``nunchaku.models.transformers.transformer_qwenimage.NunchakuQwenImageTransformer2DModel``.

Spec::

    {"backend": "nunchaku",
     "path": "svdq-int4_r32-qwen-image.safetensors",   # the quantized transformer
     "pipeline": "/models/Qwen-Image"}                  # a local diffusers dir for the rest

The transformer's module names follow nunchaku's Qwen-Image (``transformer_blocks.N.attn.to_qkv``
as ``SVDQW4A4Linear`` ...); lora_core's SVDQ target lands LoRAs on those packed layers.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Mapping

import torch

from .base import (COMMON_KEYS, BackendUnavailableError, ModelPathError, check_spec, resolve_device,
                   resolve_dtype)
from .diffusers_backend import PipelineBackend, load_pipeline

NUNCHAKU_MODULE = "nunchaku.models.transformers.transformer_qwenimage"
NUNCHAKU_CLASS = "NunchakuQwenImageTransformer2DModel"
INSTALL_HINT = (
    "nunchaku is not installed (or the installed 'nunchaku' is not nunchaku-tech's: it lacks "
    f"{NUNCHAKU_MODULE}.{NUNCHAKU_CLASS}). It is not on PyPI (the PyPI package of that name is an "
    "unrelated project: do not pip install it). Install the wheel from "
    "https://github.com/nunchaku-tech/nunchaku/releases that matches your Python, torch and CUDA "
    "versions, e.g. nunchaku-<ver>+torch<X.Y>-cp<py>-cp<py>-linux_x86_64.whl."
)


def nunchaku_transformer_class() -> type | None:
    """The real nunchaku Qwen-Image transformer class, or None when it is not importable."""
    if importlib.util.find_spec("nunchaku") is None:
        return None
    try:
        module = importlib.import_module(NUNCHAKU_MODULE)
    except Exception:  # noqa: BLE001 - a broken or foreign install counts as absent
        return None
    return getattr(module, NUNCHAKU_CLASS, None)


def nunchaku_available() -> bool:
    return nunchaku_transformer_class() is not None


class NunchakuBackend(PipelineBackend):
    KEYS = COMMON_KEYS | {"path", "pipeline", "batch", "offload"}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: str | torch.device | None = None) -> "NunchakuBackend":
        # Availability first: on a machine without nunchaku that is the one thing to fix.
        transformer_cls = nunchaku_transformer_class()
        if transformer_cls is None:
            raise BackendUnavailableError(INSTALL_HINT)
        check_spec(spec, cls.KEYS, required=("path", "pipeline"))
        path = os.fspath(spec["path"])
        if not os.path.exists(path):
            raise ModelPathError(f"nunchaku transformer not found: {path!r}")
        dev = resolve_device(device)
        dtype = resolve_dtype(spec.get("dtype"), dev)  # bf16 on GPUs, what the SVDQ kernels expect
        kwargs = {"torch_dtype": dtype} if spec.get("dtype") else {}  # else nunchaku's own default (bf16)
        try:
            transformer = transformer_cls.from_pretrained(path, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ModelPathError(f"could not load the nunchaku transformer {path!r}: {type(e).__name__}: {e}") from e
        from diffusers import QwenImagePipeline

        pipe = load_pipeline(spec["pipeline"], dtype, pipeline_cls=QwenImagePipeline, transformer=transformer)
        _place(pipe, transformer, dev, spec.get("offload", False))
        return cls(pipe, name="nunchaku", device=dev, dtype=dtype, step_cache=spec.get("step_cache"),
                   rope=spec.get("rope"), batch=bool(spec.get("batch", True)))


def _place(pipe: Any, transformer: Any, device: torch.device, offload: Any) -> None:
    """``offload``: False (all on the device), "model" (diffusers model offload, ~18 GB GPUs) or
    True / "blocks" (nunchaku's per-block offload plus sequential offload of the rest, ~4 GB)."""
    if not offload:
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        transformer.set_offload(True, use_pin_memory=False, num_blocks_on_gpu=1)
        pipe._exclude_from_cpu_offload.append("transformer")  # it moves its own blocks
        pipe.enable_sequential_cpu_offload(device=device)
