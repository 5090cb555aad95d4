"""benchmarks/gpu.py's clocks: the CUDA-event timer, the time budget and the hard stop."""
from __future__ import annotations

import time

import torch

from . import compose_setup as S

HARD_STOP_GRACE_S = 60  # the hard stop: this long past the budget


class Watchdog:
    """Interrupts the main thread (KeyboardInterrupt, ``fired`` set) ``seconds`` from now:
    a cell that overruns still leaves a JSON of what was measured. (Not SIGALRM: pytest-timeout owns it.)"""

    def __init__(self, seconds: float, why: str):
        import _thread
        import threading

        self.fired, self.why = False, why

        def fire():
            self.fired = True
            _thread.interrupt_main()

        self._timer = threading.Timer(max(1.0, seconds), fire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()


def cuda_timer(fn) -> float:
    """Seconds from a CUDA event recorded before ``fn`` to one after it, once the device has
    run everything ``fn`` queued (host-side work between the two counts too)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timer_for(device: torch.device):
    return cuda_timer if device.type == "cuda" else S.wall_timer


class Budget:
    """Seconds left of ``seconds`` since ``t0``; a cell runs only when the longest cell of its
    kind so far (0 for the first) plus ``reserve`` (for later phases) still fits."""

    def __init__(self, seconds: float, t0: float):
        self.seconds, self.t0 = seconds, t0
        self.took: dict[str, float] = {}
        self.skipped: list[dict] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def fits(self, cell: str, kind: str, reserve: float = 0.0) -> bool:
        need = self.took.get(kind, 0.0) + reserve
        if self.left() >= need:
            return True
        self.skipped.append({"cell": cell, "why": f"time budget: {self.left():.0f} s left, needs ~{need:.0f} s "
                                                  f"(longest {kind} so far + {reserve:.0f} s kept for later phases)"})
        return False

    def run(self, cell: str, kind: str, fn, reserve: float = 0.0):
        if not self.fits(cell, kind, reserve):
            return None
        t0 = time.perf_counter()
        out = fn()
        self.took[kind] = max(self.took.get(kind, 0.0), time.perf_counter() - t0)
        return out
