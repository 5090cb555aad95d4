"""lora_core: pure LoRA logic (no Ray). Load, compose, apply with exact restore."""
from __future__ import annotations

from . import errors, nunchaku
from .adapter import Adapter, LoraLayer, load_adapter
from .api import BASE_KEY, Handle, apply, apply_updates, composition_key, content_id, key_of_ids, prepare, switch
from .compose import ModuleUpdate, plan
from .model_index import ModelIndex

__all__ = [
    "Adapter", "LoraLayer", "load_adapter", "apply", "apply_updates", "prepare", "switch", "Handle", "composition_key",
    "content_id", "key_of_ids", "BASE_KEY", "ModuleUpdate", "plan", "ModelIndex", "errors", "nunchaku",
]
