"""ComposedModel: a backend plus the LoRA composition it currently holds.

Change detection is a key comparison (O(1)); composition is lazy (``want`` records the
target, ``ensure`` composes right before rendering, and only when the key or the device
changed); a change resets the backend's step cache (the seeds' multi-stage bug: a cache
calibrated on one composition must not skip steps of another); and each switch records
what it cost, which the scheduler uses.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from jobs.options import LORA_MODES, FarmOptions
from lora_core import BASE_KEY, Adapter, ModelIndex, branch_targets, key_of_ids, plan, prepare, still_fits, switch
from lora_core.api import Handle, mode_label, prepared_bytes
from lora_core.targets.lowrank import BranchClock

from .automode import AutoMode


@dataclass
class SwitchStats:
    switches: int = 0
    compose_s: float = 0.0
    last_compose_s: float = 0.0
    history: list[float] = field(default_factory=list)

    def record(self, seconds: float) -> None:
        self.switches += 1
        self.compose_s += seconds
        self.last_compose_s = seconds
        self.history = (self.history + [seconds])[-32:]

    @property
    def mean_s(self) -> float:
        return sum(self.history) / len(self.history) if self.history else 0.0


class _Kept(NamedTuple):
    """One prepared composition in the branch cache."""

    updates: dict
    nbytes: int
    swaps: bool  # a switch to it swaps tensors only (every update a ready branch or a packed SVDQ one, no diffs)
    packed: bool  # holds packed SVDQ branches (stale once their base changes: ``still_fits``)


def _kept(updates: dict, nbytes: int) -> _Kept:
    us = updates.values()
    return _Kept(updates, nbytes,
                 all((u.ready or u.packed is not None) and u.diff is None and u.diff_b is None for u in us),
                 any(u.packed is not None for u in us))


class ComposedModel:
    """``backend`` holding one composition at a time. The keyword options are the model-side
    farm options (``FarmOptions.model_options()``), with the same defaults."""

    def __init__(self, backend, lora_mode: str = FarmOptions.lora_mode, keep_originals_on: str | None = None,
                 fp8: bool = FarmOptions.fp8, memory_reserve_gb: float | None = FarmOptions.memory_reserve_gb,
                 merge_strategy: str = FarmOptions.merge_strategy, branch_cache_mb: float = FarmOptions.branch_cache_mb):
        if lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
        self.backend = backend
        self.lora_mode = lora_mode
        self.keep_originals_on = keep_originals_on
        self.key = BASE_KEY  # what the model holds now
        self._want: tuple[str, list[tuple[Adapter, float]]] = (BASE_KEY, [])
        self._held = self._want
        self._handle: Handle | None = None
        self._device: torch.device | None = None
        self._index: ModelIndex | None = None
        self.stats = SwitchStats()
        self.auto = AutoMode() if lora_mode == "auto" else None
        self.clock = BranchClock()  # times the branches' own work under ``auto``
        self.held_mode = self.mode  # the dense mode of the composition held now
        self.held_label = self.held_mode  # what result rows report: "lowrank+merge" when diffs were merged
        # prepared branches (lowrank factors, SVDQ packed branches; on the model's device) of
        # recent compositions, so switching back to one swaps tensors only; bounded in bytes,
        # least recently used out
        self.branch_cache_bytes = int(branch_cache_mb * (1 << 20))
        self._prepared: OrderedDict[tuple[str, str], _Kept] = OrderedDict()
        self.fp8_saved_bytes = 0
        self.budget = None
        if memory_reserve_gb is not None:
            from lora_core.targets.budget import BudgetState

            self.budget = BudgetState(int(memory_reserve_gb * (1 << 30)), merge_strategy)
        if fp8:
            self._quantize()

    def _quantize(self) -> None:
        """Weight-only fp8 for the blocks' linears; LoRAs then merge into their masters."""
        from lora_core.targets.fp8 import quantize_modules

        t = self.backend.transformer
        names = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in f".{n}"]
        self.fp8_saved_bytes = quantize_modules(t, names)
        self._index = None

    @property
    def index(self) -> ModelIndex:
        if self._index is None:  # module paths resolved once per model
            self._index = ModelIndex(self.backend.transformer)
        return self._index

    @property
    def mode(self) -> str:
        """The dense mode the next switch uses (``auto``: chosen by measured cost, see
        workers/automode.py); SVDQ layers always concatenate."""
        return self.auto.choice.mode if self.auto is not None else self.lora_mode

    def want(self, pairs: Sequence[tuple[Adapter, float]]) -> str:
        key = key_of_ids((a.content_id, s) for a, s in pairs)
        self._want = (key, list(pairs))
        return key

    @property
    def pending(self) -> bool:
        return self._want[0] != self.key or self._device_moved()

    def _device_moved(self) -> bool:
        return self._handle is not None and self._device != self.backend.device

    def ensure(self) -> float:
        """Compose what was asked for, if it differs from what is held. Returns seconds spent."""
        if not self.pending:
            return 0.0
        key, pairs = self._want
        t0 = time.perf_counter()
        moved = self._device_moved()
        if moved:
            self._prepared.clear()
        if self.auto is not None and pairs:
            self.auto.next_mode()
        mode = self.mode
        updates = self._planned(key, pairs, mode)  # binding errors raise before anything changes
        if moved:  # kept originals and branches live on the old device: start over from the base
            self._handle.restore()
            self._handle, self.key, self._held = None, BASE_KEY, (BASE_KEY, [])
        self.backend.reset_step_cache()
        try:
            self._handle = switch(self.index, self._handle, updates, mode, keep_originals_on=self.keep_originals_on,
                                  budget=self.budget)
        except BaseException:
            self._want = self._held  # switch put the old composition back, bit for bit
            raise
        self.key = key
        self._held = self._want
        self.held_mode = mode
        self.held_label = mode_label(updates, mode)
        self._device = self.backend.device
        seconds = time.perf_counter() - t0
        self.stats.record(seconds)
        if self.auto is not None and self._handle is not None:
            self.auto.switched(mode, seconds)
            for name, b in self._handle.branches.items():  # dense layers' branches: what merging would save
                b.clock = self.clock if self.index.kinds[name] == "linear" else None
        self.clock.take()
        return seconds

    def rendered(self, images: int, seconds: float) -> None:
        """The worker rendered ``images`` at the held composition in ``seconds`` (feeds ``auto``)."""
        branch_s = self.clock.take()
        if self.auto is not None:
            self.auto.rendered(images, seconds, branch_s if self.held_mode == "lowrank" and self._handle else None)

    def _planned(self, key: str, pairs: list[tuple[Adapter, float]], mode: str) -> dict:
        hit = self._prepared.get((mode, key))
        if hit is not None and (not hit.packed or still_fits(self.index, hit.updates)):
            self._prepared.move_to_end((mode, key))
            return hit.updates
        self._prepared.pop((mode, key), None)  # an SVDQ base changed under it: pack again
        updates = prepare(self.index, plan(pairs, self.index, branch_targets(self.index, mode)), mode)
        nbytes = prepared_bytes(updates)
        if 0 < nbytes <= self.branch_cache_bytes:
            self._prepared[(mode, key)] = _kept(updates, nbytes)
            while sum(k.nbytes for k in self._prepared.values()) > self.branch_cache_bytes:
                self._prepared.popitem(last=False)
        return updates

    def prepared_keys(self) -> tuple[str, ...]:
        """The content keys of the compositions a switch to would now swap tensors only (what
        the worker reports, ``workers.holds.Holds.prepared``): kept in the mode the next switch
        uses, branches or packed SVDQ branches only, least recently used first. Drops the ones
        an SVDQ base change made stale (a switch would pack them again). Call it holding the
        worker's model lock, as ``ensure``."""
        mode = self.mode
        for k in [k for k, kept in self._prepared.items() if kept.packed and not still_fits(self.index, kept.updates)]:
            del self._prepared[k]
        return tuple(key for (m, key), kept in self._prepared.items() if m == mode and kept.swaps)

    def reset(self) -> None:
        """Back to the base model."""
        self.want([])
        self.ensure()
