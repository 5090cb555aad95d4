"""The names of how LoRAs land on a model, listed once (torch-free, so ``jobs`` can validate them).

- ``APPLY_MODES``: how a dense update lands on a layer. ``merge`` folds ΔW into the weight;
  ``lowrank`` adds a runtime branch y = Wx + B(Ax). (The farm adds ``auto``, which picks one
  of these by measured cost: ``jobs.options.LORA_MODES``.)
- ``MERGE_STRATEGIES``: what a merge does with kept originals once the memory reserve is
  reached (``lora_core/targets/budget.py``).
"""
from __future__ import annotations

APPLY_MODES = ("merge", "lowrank")
MERGE_STRATEGIES = ("keep_until_full", "rotate")

__all__ = ["APPLY_MODES", "MERGE_STRATEGIES"]
