"""What a worker reports holding, with each render call's rows (no torch: the dispatcher's
side unpickles it).

``RenderWorker.render`` returns ``Rows``: the call's result rows, a plain list as before, plus
``holds``, the worker's own account of what it holds after them. The dispatcher takes that as
the truth about its branch cache and its adapters in memory (``farm.books.WorkerBook.report``)
instead of guessing from the rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Holds:
    """One worker's holdings at one moment.

    ``prepared``: the content keys (a row's ``composition_key``) of the compositions whose
    branches it keeps prepared, so that a switch to one swaps tensors only; least recently
    used first. ``adapters``: the URIs of the adapters in its memory. ``origin`` names the
    worker process (a restarted actor is a new one and starts empty); ``seq`` orders one
    process's reports (two calls in flight may come back out of order: the later ``seq`` wins).
    """

    origin: str
    seq: int
    prepared: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()


class Rows(list):
    """A render call's result rows (``jobs.results.ResultRow``), and ``holds``: the worker's
    latest report when the call returned. Each group that reaches the model (its adapters
    fetched) takes one under the model lock, rendered or failed, so it is the report of this
    call's last such group or of a later group of another call in flight beside it; when none
    of this call's groups got that far (each failed fetching) it is an earlier call's; None when
    no group has reached the model since the process started. ``seq`` orders them."""

    def __init__(self, rows: Iterable = (), holds: Holds | None = None) -> None:
        super().__init__(rows)
        self.holds = holds
