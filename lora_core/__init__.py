"""lora_core: pure LoRA logic (no Ray, no fsspec). Load, compose, apply with exact restore.

Remote files reach it through a fetcher (``load_adapter(url, fetch=store)``); without one,
``storage``'s default store is imported on first use. The names below are imported on
first use too (PEP 562), so that light users of the package (``lora_core.modes`` from
``jobs/``, which ``farm validate`` needs) do not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Adapter": "adapter", "Fetcher": "adapter", "LoraLayer": "adapter", "load_adapter": "adapter",
    "BASE_KEY": "api", "Handle": "api", "apply": "api", "apply_updates": "api", "composition_key": "api",
    "content_id": "api", "key_of_ids": "api", "prepare": "api", "switch": "api", "branch_targets": "api",
    "still_fits": "api",
    "ModuleUpdate": "compose", "plan": "compose", "ModelIndex": "model_index",
}
_MODULES = ("errors", "nunchaku")

__all__ = [*_WHERE, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
