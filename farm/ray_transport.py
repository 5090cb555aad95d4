"""The Dispatcher's transport over Ray actors: the only place dispatcher-side that imports
ray, and where Ray's exception types become the transport's (``farm/transport.py``)."""
from __future__ import annotations

import time
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from .transport import Ref, TaskFailed, TransportError, TransportTimeout, WorkerLost


class RayTransport:
    """``handle.<method>.remote(...)``, ``ray.wait``, ``ray.get``, ``ray.cancel``, ``time.monotonic``."""

    def submit(self, handle: Any, method: str, *args: Any) -> Ref:
        return getattr(handle, method).remote(*args)

    def wait(self, refs: Sequence[Ref], *, num_returns: int = 1,
             timeout: float | None = None) -> tuple[list[Ref], list[Ref]]:
        return ray.wait(list(refs), num_returns=num_returns, timeout=timeout)

    def get(self, ref: Ref) -> Any:
        try:
            return ray.get(ref)
        except RayError as e:
            raise seam_error(e) from e

    def cancel(self, ref: Ref) -> None:
        ray.cancel(ref, force=False)

    def now(self) -> float:
        return time.monotonic()


def seam_error(e: RayError) -> TransportError:
    """The transport error for a Ray error; the message keeps Ray's type name (it lands in
    a failed job's ``error`` column)."""
    if isinstance(e, RayActorError):  # the actor died (ActorDiedError, a lost node, ...)
        kind: type[TransportError] = WorkerLost
    elif isinstance(e, RayTaskError):
        kind = TaskFailed
    elif isinstance(e, GetTimeoutError):
        kind = TransportTimeout
    else:
        kind = TransportError
    return kind(f"{type(e).__name__}: {e}")
