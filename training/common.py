"""What every training stage shares: a loss curve and seeded construction."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class Curve:
    """A stage's loss per step and the seconds it took."""

    name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, step: int, loss: float) -> None:
        assert step == len(self.losses), "one loss per step, in order"
        self.losses.append(loss)

    def points(self, every: int = 25) -> list[tuple[int, float]]:
        """(step, mean loss of the ``every`` steps ending there): what the log keeps."""
        out = []
        for end in range(every, len(self.losses) + 1, every):
            window = self.losses[end - every:end]
            out.append((end, round(sum(window) / len(window), 6)))
        return out

    def to_json(self, every: int = 25) -> dict:
        return {"name": self.name, "steps": len(self.losses), "seconds": round(self.seconds, 1),
                "first": round(self.losses[0], 6) if self.losses else None,
                "last_mean": self.points(every)[-1][1] if len(self.losses) >= every else None,
                "every": every, "curve": self.points(every)}


@contextlib.contextmanager
def seeded(seed: int):
    """Construct under ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
