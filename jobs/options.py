"""Farm options: each one's default and allowed values, declared once.

``FarmOptions`` is what a manifest's ``options:`` section becomes (``jobs/validate.py``
``check_options`` builds it, reading the allowed values from the field metadata below),
what ``farm run`` forwards, and what a ``RenderWorker`` accepts. Frozen and made of plain
values, so it pickles across Ray unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from lora_core.modes import APPLY_MODES, MERGE_STRATEGIES

#: The model backends a manifest may name (``model.backend``).
BACKENDS = ("tiny", "diffusers", "nunchaku")
#: Backends whose weights live on disk: a manifest must give ``model.path``.
PATH_BACKENDS = ("diffusers", "nunchaku")
#: Backends whose transformer can be built on the meta device without its weights (from a
#: config, or nunchaku's from its checkpoint's header): ``farm validate --deep`` binds LoRAs
#: to it; any other: fetch, checksum and header only.
META_BACKENDS = ("tiny", "diffusers", "nunchaku")
#: ``auto`` picks one of the apply modes per switch by measured cost (workers/automode.py).
LORA_MODES = (*APPLY_MODES, "auto")


def _option(default: Any, *, choices: Iterable[str] | None = None, lo: float | None = None) -> Any:
    """A field whose metadata says what a manifest may set it to: ``choices`` or a lower bound ``lo``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices) if choices else None, "lo": lo})


@dataclass(frozen=True)
class FarmOptions:
    lora_mode: str = _option("auto", choices=LORA_MODES)
    max_batch: int = _option(4, lo=1)              # images per backend call
    retries: int = _option(2, lo=0)                # re-sends of a transiently failed job
    fp8: bool = _option(False)                     # weight-only fp8 after merge (fuse, then quantize)
    memory_reserve_gb: float | None = _option(None, lo=0.0)  # keep this much free on the device while merging
    merge_strategy: str = _option("keep_until_full", choices=MERGE_STRATEGIES)
    branch_cache_mb: float = _option(1024, lo=0.0)  # device memory for prepared branches of recent compositions
    max_lora_mb: float = _option(4096, lo=1.0)     # largest LoRA file a worker downloads (refused / cut off past it)

    #: The options ``ComposedModel`` takes (the rest are the worker's and the dispatcher's).
    MODEL_FIELDS = ("lora_mode", "fp8", "memory_reserve_gb", "merge_strategy", "branch_cache_mb")

    def as_dict(self) -> dict[str, Any]:
        """Every option by name (the manifest's ``options:`` syntax)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def model_options(self) -> dict[str, Any]:
        """The keyword arguments of ``ComposedModel`` these options set."""
        return {name: getattr(self, name) for name in self.MODEL_FIELDS}

    def override(self, **changes: Any) -> "FarmOptions":
        """A copy with the non-None ``changes`` (command-line flags left unset change nothing)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The options' fields, in declaration order, with their ``choices`` / ``lo`` metadata."""
    return dataclasses.fields(FarmOptions)


__all__ = [
    "BACKENDS", "LORA_MODES", "META_BACKENDS", "PATH_BACKENDS", "MERGE_STRATEGIES", "FarmOptions", "option_fields",
]
