"""What every render backend offers, and the helpers each uses to read its spec.

A backend owns one diffusion pipeline. ``transformer`` is the module LoRA target names are
relative to (diffusers names such as ``transformer_blocks.0.attn.to_q``), so lora_core can
bind a LoRA to it without knowing which backend it came from.

Specs are plain dicts (the manifest's ``model:`` section)::

    {"backend": "tiny"}                                   # built in, runs anywhere
    {"backend": "diffusers", "path": DIR, "dtype": "bfloat16"}
    {"backend": "nunchaku", "path": FILE, "pipeline": DIR}

A manifest's ``model:`` may also carry ``args:`` (backend-specific options, as
jobs.validate passes them through); they are merged into the spec before it is checked.
``dtype: auto`` is the same as leaving it out.

Every backend also takes ``dtype``, ``step_cache`` (keyword arguments of
:class:`workers.stepcache.StepCache`) and ``rope`` (``{"factor": 2.0,
"timestep_threshold": 0.9}``, see :mod:`workers.rope`). Unknown keys are an error: a typo
must not silently render with the defaults.

Which backend a spec names is looked up in :mod:`workers.backends.registry` (``make_backend``);
this module knows no concrete backend, so each of them can import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

COMMON_KEYS = frozenset({"backend", "dtype", "step_cache", "rope"})
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class BackendError(Exception):
    """Base class of the errors raised while building or running a backend."""


class BackendSpecError(BackendError, ValueError):
    """The spec itself is wrong. ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("bad model spec: " + "; ".join(self.problems))


class BackendUnavailableError(BackendError, ImportError):
    """The backend needs a package that is not installed (the message says how to get it)."""


class ModelPathError(BackendError, FileNotFoundError):
    """The model path is missing or does not hold what the backend expects."""


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 4
    width: int = 256
    height: int = 256
    guidance: float = 1.0

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (prompts and seeds may differ)."""
        return (self.steps, self.width, self.height, float(self.guidance), bool(self.negative_prompt))


@runtime_checkable
class Backend(Protocol):
    name: str
    transformer: torch.nn.Module  # the root that LoRA target names are relative to
    device: torch.device
    dtype: torch.dtype

    def render(self, batch: list[RenderRequest]) -> list[Any]:  # list[PIL.Image.Image]
        ...

    def reset_step_cache(self) -> None:
        ...

    def to(self, device: str | torch.device) -> "Backend":
        ...


def resolve_dtype(value: Any, device: torch.device) -> torch.dtype:
    """``None`` -> fp32 on CPU (fast and exact there), bf16 on accelerators."""
    if value is None or value == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise BackendSpecError([f"dtype: unknown {value!r} (one of {sorted(set(_DTYPES))})"])
    return _DTYPES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_spec(spec: Mapping[str, Any], allowed: frozenset[str], required: tuple[str, ...] = ()) -> None:
    """Raise one BackendSpecError that lists every unknown and every missing key."""
    name = spec.get("backend", "tiny")
    problems = [f"{k}: unknown key for backend {name!r} (allowed: {sorted(allowed)})"
                for k in sorted(set(spec) - allowed)]
    problems += [f"{k}: required for backend {name!r}" for k in required if not spec.get(k)]
    for key in ("step_cache", "rope"):
        if key in spec and spec[key] is not None and not isinstance(spec[key], Mapping):
            problems.append(f"{key}: must be a mapping, got {type(spec[key]).__name__}")
    if problems:
        raise BackendSpecError(problems)


def flatten_args(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a manifest's ``args:`` mapping into the spec; a key given in both places is an error."""
    spec = dict(spec)
    args = spec.pop("args", None) or {}
    if not isinstance(args, Mapping):
        raise BackendSpecError([f"args: must be a mapping, got {type(args).__name__}"])
    clash = sorted(set(args) & set(spec))
    if clash:
        raise BackendSpecError([f"args.{k}: also given outside args" for k in clash])
    return {**spec, **args}
