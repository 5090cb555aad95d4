"""What the Dispatcher needs from a cluster: send a call to a worker, wait for calls, read
one call's result, cancel one, and a clock.

The Dispatcher (``farm/dispatcher.py``) is written against this Protocol only, so its
retry, actor-death and Ctrl-C logic runs the same over Ray (``farm/ray_transport.py``,
the default) and over an in-memory fake in the unit tests. A transport reports a call
that could not deliver its result with one of the errors below, never its own types.
"""
from __future__ import annotations

from typing import Any, Hashable, Protocol, Sequence

Ref = Hashable  # one call in flight; opaque to the Dispatcher, a dict key


class TransportError(Exception):
    """A call's result could not be read; the jobs it carried are lost (retried elsewhere)."""


class WorkerLost(TransportError):
    """The worker died with the call in hand; if it is restarted it comes back empty."""


class TaskFailed(TransportError):
    """The call raised on the worker (the worker itself lives on)."""


class TransportTimeout(TransportError):
    """Reading the call's result took too long."""


class Transport(Protocol):
    def submit(self, handle: Any, method: str, *args: Any) -> Ref:
        """Start ``handle.<method>(*args)`` on the worker; returns at once."""
        ...

    def wait(self, refs: Sequence[Ref], *, num_returns: int = 1,
             timeout: float | None = None) -> tuple[list[Ref], list[Ref]]:
        """``(ready, not_ready)`` once ``num_returns`` of ``refs`` are done or ``timeout``
        seconds passed. May raise KeyboardInterrupt (Ctrl-C while waiting)."""
        ...

    def get(self, ref: Ref) -> Any:
        """The finished call's return value, or a ``TransportError``."""
        ...

    def cancel(self, ref: Ref) -> None:
        """Stop a call in flight if the worker has not finished it (best effort)."""
        ...

    def now(self) -> float:
        """Monotonic seconds: the clock the scheduling policy is given."""
        ...
