"""The undo ledger: original tensors kept by copy so restore is bit-exact (never subtraction)."""
from __future__ import annotations

from typing import Callable

import torch


class Ledger:
    """Undo steps in application order; ``rollback`` runs them newest first, once."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def record(self, module: str, undo: Callable[[], None]) -> None:
        self._undo.append((module, undo))

    @property
    def modules(self) -> list[str]:
        return [m for m, _ in self._undo]

    def rollback(self) -> None:
        with torch.no_grad():
            while self._undo:
                _, undo = self._undo.pop()
                undo()

    def __len__(self) -> int:
        return len(self._undo)
