"""LyCORIS LoCon files: ``lycoris_<underscored module>.lora_down.weight`` / ``lora_up`` / ``alpha``."""
from __future__ import annotations

from typing import Iterable

from . import rule

NAME = "lycoris"

RULES = (
    rule(r"^(?P<target>lycoris_.+)\.lora_down\.weight$", "A"),
    rule(r"^(?P<target>lycoris_.+)\.lora_up\.weight$", "B"),
    rule(r"^(?P<target>lycoris_.+)\.alpha$", "alpha"),
)


def detect(keys: Iterable[str]) -> bool:
    return any(k.startswith("lycoris_") and k.endswith(".lora_down.weight") for k in keys)
