"""Key-naming schemes of LoRA files, one module each, detected by a registry of predicates.

Each scheme module exposes ``NAME``, ``detect(keys) -> bool`` and ``RULES``: a table of
(regex with a ``target`` group, role) where role is ``A`` (down), ``B`` (up) or ``alpha``.
Detection must be unambiguous: zero or several matching schemes is an error, never
first-match-wins. Adapter types we do not support (LoKr, LoHa, IA3, DoRA, Tucker)
are recognised by ``unsupported.detect`` and get a named error. nunchaku's own converted
files have their own reader (``nunchaku_converted``: Qwen-Image; ``nunchaku_flux``: Flux).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    role: str  # "A" | "B" | "alpha"


def rule(regex: str, role: str) -> Rule:
    return Rule(re.compile(regex), role)


from . import kohya, lycoris, nunchaku_converted, peft, unsupported  # noqa: E402  (Rule must exist first)

SCHEMES: tuple[ModuleType, ...] = (peft, kohya, lycoris)

__all__ = ["Rule", "rule", "SCHEMES", "nunchaku_converted", "unsupported"]
