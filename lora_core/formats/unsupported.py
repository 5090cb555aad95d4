"""Adapter types that are not low-rank B@A: recognised by their key names, refused by name.

Full-weight diffs (``.diff`` / ``.diff_b``) are supported: see ``lora_core.diffs``."""
from __future__ import annotations

from typing import Iterable

# (marker found in a key, the name we report)
MARKERS = (
    ("lokr_w1", "LoKr"),
    ("lokr_w2", "LoKr"),
    ("hada_w1", "LoHa"),
    ("hada_w2", "LoHa"),
    (".ia3_l", "IA3"),
    (".on_input", "IA3"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".lora_mid.", "LoCon-Tucker"),
)


def detect(keys: Iterable[str]) -> str | None:
    """The unsupported adapter type these keys belong to, or None."""
    for key in keys:
        for marker, name in MARKERS:
            if marker in key:
                return name
    return None
