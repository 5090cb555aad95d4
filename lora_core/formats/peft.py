"""diffusers / PEFT: ``<module>.lora_A[.<adapter>].weight``, ``lora_B``, optional ``<module>.alpha``."""
from __future__ import annotations

from typing import Iterable

from . import rule

NAME = "peft"

# The optional adapter name (``.default.``) is any single path component except "weight".
RULES = (
    rule(r"^(?P<target>.+)\.lora_A(?:\.(?!weight$)[^.]+)?\.weight$", "A"),
    rule(r"^(?P<target>.+)\.lora_B(?:\.(?!weight$)[^.]+)?\.weight$", "B"),
    rule(r"^(?P<target>.+)\.alpha$", "alpha"),
)


def detect(keys: Iterable[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)
