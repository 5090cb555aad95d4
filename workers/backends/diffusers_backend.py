"""Backends over a diffusers pipeline: the shared render loop, and local pipeline directories.

:class:`PipelineBackend` holds any diffusers pipeline (Qwen-Image, Flux, Z-Image, SDXL ...)
and renders :class:`RenderRequest` batches through the pipeline's own ``__call__``; the
tiny and nunchaku backends are this class around a pipeline they build differently.
:class:`DiffusersBackend` loads a pipeline directory written by ``save_pretrained``
(``model_index.json`` at its root), from local files only.
"""
from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from typing import Any, Mapping

import torch

from ..rope import RopeScaling, rope_from_spec
from ..stepcache import StepCache, step_cache_from_spec
from .base import (COMMON_KEYS, BackendSpecError, ModelPathError, RenderRequest, check_spec, resolve_device,
                   resolve_dtype)


class PipelineBackend:
    """A diffusers pipeline as a render backend.

    Batching: requests that share steps/size/guidance (prompts, negative prompts and seeds
    may differ) go through one pipeline call with one CPU generator per request, so each
    image's starting noise depends only on its own seed. ``batch=False`` renders one
    request per call; use it where bit-identical images across batch compositions matter
    more than throughput (the tiny backend measures which it gets, see tiny.py).
    """

    def __init__(self, pipe: Any, name: str, device: torch.device, dtype: torch.dtype,
                 step_cache: Mapping[str, Any] | StepCache | None = None,
                 rope: Mapping[str, Any] | RopeScaling | None = None, batch: bool = True, max_batch: int = 8):
        self.pipe = pipe
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch = batch
        self.max_batch = max(1, int(max_batch))
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self._params = set(inspect.signature(pipe.__call__).parameters)
        self.step_cache: StepCache | None = None
        self.rope: RopeScaling | None = None
        try:
            if step_cache is not None:
                self.set_step_cache(step_cache)
            if rope is not None:
                self.set_rope_scaling(rope)
        except (TypeError, ValueError) as e:
            raise BackendSpecError([str(e)]) from e

    # ---- the Backend protocol -------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser: LoRA target names are relative to it (``pipe.transformer`` or ``pipe.unet``)."""
        for attr in ("transformer", "unet"):
            module = getattr(self.pipe, attr, None)
            if module is not None:
                return module
        raise AttributeError(f"{type(self.pipe).__name__} has neither a transformer nor a unet")

    def render(self, batch: list[RenderRequest]) -> list[Any]:
        """One PIL image per request, in request order."""
        images: list[Any] = [None] * len(batch)
        for indices in self._plan(batch):
            reqs = [batch[i] for i in indices]
            for i, image in zip(indices, self._call(reqs)):
                images[i] = image
        return images

    def reset_step_cache(self) -> None:
        if self.step_cache is not None:
            self.step_cache.reset()

    def to(self, device: str | torch.device) -> "PipelineBackend":
        self.pipe.to(device)
        self.device = torch.device(device)
        self.reset_step_cache()  # cached outputs live on the old device
        return self

    # ---- options --------------------------------------------------------------------------
    def set_step_cache(self, cache: Mapping[str, Any] | StepCache | None) -> StepCache | None:
        """Attach a step cache (a StepCache or its keyword arguments); None removes it."""
        if self.step_cache is not None:
            self.step_cache.detach()
        self.step_cache = step_cache_from_spec(dict(cache)) if isinstance(cache, Mapping) else cache
        if self.step_cache is not None:
            self.step_cache.attach(self.transformer)
        return self.step_cache

    def set_rope_scaling(self, rope: Mapping[str, Any] | RopeScaling | None) -> RopeScaling | None:
        if self.rope is not None:
            self.rope.detach()
        self.rope = rope_from_spec(dict(rope)) if isinstance(rope, Mapping) else rope
        if self.rope is not None:
            self.rope.attach(self.transformer)
        return self.rope

    # ---- internals ------------------------------------------------------------------------
    def _plan(self, batch: list[RenderRequest]) -> list[list[int]]:
        if not self.batch:
            return [[i] for i in range(len(batch))]
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, req in enumerate(batch):
            groups.setdefault(req.batch_key, []).append(i)
        return [g[j : j + self.max_batch] for g in groups.values() for j in range(0, len(g), self.max_batch)]

    def _check(self, reqs: list[RenderRequest]) -> None:
        """Reject sizes the pipeline would silently round (its image would not be the size asked for)."""
        processor = getattr(self.pipe, "image_processor", None)
        multiple = int(getattr(getattr(processor, "config", None), "vae_scale_factor", 1) or 1)
        problems = []
        # A flow-match schedule stretched to a terminal shift divides by zero with one step
        # (diffusers' stretch_shift_to_terminal): the image would be NaN, i.e. black.
        sched_cfg = getattr(getattr(self.pipe, "scheduler", None), "config", None)
        min_steps = 2 if getattr(sched_cfg, "shift_terminal", None) else 1
        for r in reqs:
            if r.steps < min_steps:
                problems.append(f"steps must be >= {min_steps} for this model's scheduler, got {r.steps}")
            if r.width <= 0 or r.height <= 0 or r.width % multiple or r.height % multiple:
                problems.append(f"{r.width}x{r.height}: width and height must be positive multiples of "
                                f"{multiple} for {type(self.pipe).__name__}")
        if problems:
            raise ValueError("bad render request: " + "; ".join(dict.fromkeys(problems)))

    def _call(self, reqs: list[RenderRequest]) -> list[Any]:
        self._check(reqs)
        first = reqs[0]
        kwargs: dict[str, Any] = dict(
            prompt=[r.prompt for r in reqs], num_inference_steps=first.steps, width=first.width,
            height=first.height, output_type="pil",
            # CPU generators: the noise of a seed is the same on every device and in every batch.
            generator=[torch.Generator("cpu").manual_seed(int(r.seed)) for r in reqs],
        )
        kwargs.update(self._guidance_kwargs(reqs))
        if self.step_cache is not None:
            self.step_cache.begin_run(first.steps)
        try:
            out = self.pipe(**kwargs)
        finally:
            if self.step_cache is not None:
                self.step_cache.end_run()
        return list(out.images)

    def _guidance_kwargs(self, reqs: list[RenderRequest]) -> dict[str, Any]:
        """Map ``guidance`` and ``negative_prompt`` onto what this pipeline calls them.

        Guidance-distilled transformers (Flux dev) take it as ``guidance_scale``, an input
        of the model. Qwen-Image-style pipelines do true CFG with ``true_cfg_scale`` and a
        negative prompt; an empty negative prompt means no CFG (half the transformer calls).
        Classic pipelines (SDXL, Z-Image) take ``guidance_scale`` and an optional negative.
        """
        guidance = float(reqs[0].guidance)
        negatives = [r.negative_prompt for r in reqs]
        has_negative = any(negatives)
        distilled = bool(getattr(getattr(self.transformer, "config", None), "guidance_embeds", False))
        out: dict[str, Any] = {}
        if "true_cfg_scale" in self._params:
            if distilled and "guidance_scale" in self._params:
                out["guidance_scale"] = guidance
                out["true_cfg_scale"] = 1.0
            elif has_negative and guidance > 1.0:
                out["true_cfg_scale"] = guidance
                out["negative_prompt"] = negatives
            else:
                out["true_cfg_scale"] = 1.0
            return out
        if "guidance_scale" in self._params:
            out["guidance_scale"] = guidance
        if has_negative and "negative_prompt" in self._params:
            out["negative_prompt"] = negatives
        return out


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); older releases know only the old."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - present since the rename
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype, pipeline_cls: Any = None, **kwargs: Any) -> Any:
    """``from_pretrained`` from local files only, with errors that name the path.

    ``pipeline_cls`` defaults to ``DiffusionPipeline`` (the class named in model_index.json);
    ``kwargs`` go to ``from_pretrained``: components that replace parts of the pipeline (a
    quantized ``transformer``), ``variant``.
    """
    if pipeline_cls is None:
        from diffusers import DiffusionPipeline as pipeline_cls

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelPathError(f"model path does not exist: {path!r}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelPathError(f"not a diffusers pipeline directory (no model_index.json): {path!r}")
    try:
        return pipeline_cls.from_pretrained(path, local_files_only=True, **{_dtype_kwarg(): dtype}, **kwargs)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one error naming the path
        raise ModelPathError(f"could not load the pipeline at {path!r}: {type(e).__name__}: {e}") from e


class DiffusersBackend(PipelineBackend):
    KEYS = COMMON_KEYS | {"path", "batch", "variant"}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: str | torch.device | None = None) -> "DiffusersBackend":
        check_spec(spec, cls.KEYS, required=("path",))
        dev = resolve_device(device)
        dtype = resolve_dtype(spec.get("dtype"), dev)
        extra = {"variant": spec["variant"]} if spec.get("variant") else {}  # e.g. "fp16" weight files
        pipe = load_pipeline(spec["path"], dtype, **extra).to(dev)
        return cls(pipe, name="diffusers", device=dev, dtype=dtype, step_cache=spec.get("step_cache"),
                   rope=spec.get("rope"), batch=bool(spec.get("batch", True)))


#: Where a pipeline directory keeps its denoiser, in the order ``PipelineBackend.transformer`` looks.
DENOISER_DIRS = ("transformer", "unet")


def meta_transformer(path: str | os.PathLike) -> torch.nn.Module:
    """A pipeline directory's denoiser built on the meta device from its ``config.json`` only:
    every module and shape, no weight file read, nothing allocated, so a 20B model takes
    seconds. Errors name the path (``ModelPathError``)."""
    import json

    import diffusers

    path = os.fspath(path)
    for sub in DENOISER_DIRS:
        config_path = os.path.join(path, sub, "config.json")
        if os.path.isfile(config_path):
            break
    else:
        raise ModelPathError(f"no transformer/config.json or unet/config.json under {path!r}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        cls = getattr(diffusers, str(config.get("_class_name")))
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure becomes one error naming the file
        raise ModelPathError(f"could not build the model of {config_path!r} on the meta device: "
                             f"{type(e).__name__}: {e}") from e
