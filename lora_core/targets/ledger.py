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

    def take(self, modules: set[str]) -> list[tuple[str, Callable[[], None]]]:
        """Remove and return the undo steps of ``modules`` (in order), e.g. to hand them to
        the ledger of the composition that keeps those modules."""
        taken = [e for e in self._undo if e[0] in modules]
        self._undo = [e for e in self._undo if e[0] not in modules]
        return taken

    def extend(self, entries: list[tuple[str, Callable[[], None]]]) -> None:
        self._undo.extend(entries)

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
