"""A MagCache-style step cache: skip whole transformer calls whose output barely changes.

MagCache (Ma et al., 2025) observes that the ratio of output magnitudes between two
consecutive denoising steps, ``||out_t|| / ||out_{t-1}||``, is stable across prompts and
seeds for a given model and schedule. Calibrate once (``calibrate=True``: every step is
computed, the per-step ratios are recorded and printed as a list to paste), then run
with ``mag_ratios``: at each step the accumulated ratio drift ``|1 - prod(ratios)|`` is
summed into an error; while that error stays below ``threshold`` (and at most ``k`` steps
in a row, and never in the first ``retention_ratio`` of steps) the call is skipped and the
previous output is returned instead.

We cache at the level of the whole transformer call (its output, the velocity of a flow
model) rather than inside the block stack: one wrapper fits every backend, including
nunchaku's fused transformer whose blocks we cannot hook, and a skip saves the embedding
and projection layers too.

Two pieces:

- :class:`MagCachePolicy` and :class:`SkipState`: the pure skip decision, no torch.
- :class:`StepCache`: wraps ``transformer.forward``; routes calls to per-stream state
  (a pipeline with true CFG calls the transformer twice per step: "cond" then "uncond",
  each with its own cached output) and detects step and run boundaries from the timestep.

Per-run state never outlives a run: :meth:`StepCache.reset` clears it, the backends call
:meth:`StepCache.begin_run` before every pipeline call, and a timestep that goes *up* is
read as a new run even without either (a cached output from another prompt, another LoRA
composition or another stage of a multi-stage workflow is never reused).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class SkipState:
    """Accumulators of one stream for one run."""

    step: int = 0
    acc_ratio: float = 1.0
    acc_err: float = 0.0
    acc_steps: int = 0  # consecutive skips so far

    def clear_accumulators(self) -> None:
        self.acc_ratio, self.acc_err, self.acc_steps = 1.0, 0.0, 0


def nearest_interp(values: Sequence[float], length: int) -> list[float]:
    """Resample a calibration list to ``length`` steps (nearest neighbour, ends pinned)."""
    values = list(values)
    if length <= 0 or not values:
        return []
    if length == 1 or len(values) == 1:
        return [values[-1]] * length
    scale = (len(values) - 1) / (length - 1)
    return [values[int(math.floor(i * scale + 0.5))] for i in range(length)]


class MagCachePolicy:
    """The skip decision, as a pure function of a :class:`SkipState` (testable without a model)."""

    def __init__(self, mag_ratios: Sequence[float], threshold: float = 0.06, retention_ratio: float = 0.2,
                 k: int = 2):
        problems = []
        if not mag_ratios:
            problems.append("mag_ratios: empty (calibrate first)")
        if threshold < 0:
            problems.append(f"threshold: must be >= 0, got {threshold}")
        if not 0.0 <= retention_ratio <= 1.0:
            problems.append(f"retention_ratio: must be in [0, 1], got {retention_ratio}")
        if k < 0:
            problems.append(f"k: must be >= 0, got {k}")
        if problems:
            raise ValueError("bad step cache settings: " + "; ".join(problems))
        self.mag_ratios = [float(r) for r in mag_ratios]
        self.threshold = float(threshold)
        self.retention_ratio = float(retention_ratio)
        self.k = int(k)

    def ratios_for(self, num_steps: int | None) -> list[float]:
        if not num_steps or num_steps == len(self.mag_ratios):
            return self.mag_ratios
        return nearest_interp(self.mag_ratios, num_steps)

    def retention_steps(self, num_steps: int | None) -> int:
        n = num_steps or len(self.mag_ratios)
        # Round half up, and step 0 is always computed: there is nothing to reuse yet.
        return max(1, int(self.retention_ratio * n + 0.5))

    def decide(self, state: SkipState, num_steps: int | None = None, has_cached: bool = True) -> bool:
        """True: compute this step. False: reuse the cached output. Advances ``state.step``."""
        step = state.step
        state.step += 1
        if step < self.retention_steps(num_steps) or not has_cached:
            state.clear_accumulators()
            return True
        ratios = self.ratios_for(num_steps)
        ratio = ratios[step] if step < len(ratios) else 1.0
        state.acc_ratio *= ratio
        state.acc_steps += 1
        state.acc_err += abs(1.0 - state.acc_ratio)
        if state.acc_err < self.threshold and state.acc_steps <= self.k:
            return False
        # Computing resets the drift: the fresh output is the new reference.
        state.clear_accumulators()
        return True


@dataclass
class _Stream:
    state: SkipState = field(default_factory=SkipState)
    output: Any = None  # the last computed output, as the transformer returned it


def read_timestep(args: tuple, kwargs: dict) -> float | None:
    """The (first) timestep of a transformer call, wherever the model takes it."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return float(t)


def _main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample  # diffusers' Transformer2DModelOutput / UNet2DConditionOutput


def _clone_output(output: Any) -> Any:
    """A copy the caller may modify without touching the cache."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)([output[0].clone(), *output[1:]])
    return type(output)(sample=output.sample.clone())


class StepCache:
    """Wraps a transformer's forward to skip calls MagCache-style, or to calibrate the ratios."""

    def __init__(self, threshold: float = 0.06, retention_ratio: float = 0.2, k: int = 2,
                 mag_ratios: Sequence[float] | None = None, calibrate: bool = False, verbose: bool = True):
        if not calibrate and not mag_ratios:
            raise ValueError("step cache: mag_ratios are model-specific; run once with calibrate=True "
                             "and pass the printed list as mag_ratios")
        self.calibrate = bool(calibrate)
        self.policy = MagCachePolicy(mag_ratios or [1.0], threshold, retention_ratio, k)
        self.verbose = verbose
        self.stats = {"calls": 0, "computed": 0, "skipped": 0}
        self.calibrations: list[list[float]] = []  # one list per calibrated run
        self._module: torch.nn.Module | None = None
        self._original: Callable | None = None
        self._had_own_forward = False
        self.reset()

    # ---- life cycle -----------------------------------------------------------------------
    def attach(self, module: torch.nn.Module) -> "StepCache":
        if self._module is not None:
            raise RuntimeError("this StepCache is already attached; detach() it first")
        if getattr(module.forward, "_step_cache", None) is not None:
            raise RuntimeError("the module already carries a StepCache; detach that one first")
        self._had_own_forward = "forward" in vars(module)
        self._original = module.forward

        def forward(*args, **kwargs):
            return self._call(args, kwargs)

        forward._step_cache = self  # type: ignore[attr-defined]
        module.forward = forward  # an instance attribute shadows the class method; undone in detach
        self._module = module
        return self

    def detach(self) -> None:
        if self._module is None:
            return
        if self._had_own_forward:
            self._module.forward = self._original
        else:
            del self._module.forward
        self._module = self._original = None
        self.reset()

    def reset(self) -> None:
        """Clear every piece of per-run state (cached outputs, accumulators, step counters)."""
        self._flush_calibration()
        self._streams: dict[int, _Stream] = {}
        self._last_t: float | None = None
        self._call_in_step = 0
        self._num_steps: int | None = None
        self._run_ratios: list[float] = []
        self._prev_for_ratio: torch.Tensor | None = None

    def begin_run(self, num_steps: int | None = None) -> None:
        """Start a run of ``num_steps`` steps (used to resample ``mag_ratios`` and for retention)."""
        self.reset()
        self._num_steps = num_steps

    def end_run(self) -> list[float] | None:
        """Finish a run; in calibration mode print and return its ratios."""
        ratios = self._flush_calibration()
        self._streams = {}
        self._prev_for_ratio = None
        return ratios

    # ---- calibration ----------------------------------------------------------------------
    def calibrated_ratios(self) -> list[float]:
        """Element-wise mean over the calibrated runs of the most common length."""
        if not self.calibrations:
            return []
        lengths = [len(r) for r in self.calibrations]
        n = max(set(lengths), key=lengths.count)
        runs = [r for r in self.calibrations if len(r) == n]
        return [round(sum(col) / len(col), 5) for col in zip(*runs)]

    def _flush_calibration(self) -> list[float] | None:
        ratios = getattr(self, "_run_ratios", None)
        if not self.calibrate or not ratios:
            return None
        ratios = [round(r, 5) for r in ratios]
        self.calibrations.append(ratios)
        self._run_ratios = []
        if self.verbose:
            print(f"[step cache] calibrated mag_ratios ({len(ratios)} steps): {ratios!r}", file=sys.stderr)
        return ratios

    def _record_ratio(self, out: torch.Tensor) -> None:
        cur = out.detach().float()
        if self._prev_for_ratio is None:
            ratio = 1.0  # the first step has nothing to compare with
        else:
            # Per-token magnitude ratio, averaged: robust to a few tokens with tiny norms.
            ratio = float((cur.norm(dim=-1) / (self._prev_for_ratio.norm(dim=-1) + 1e-8)).mean())
        self._run_ratios.append(ratio)
        self._prev_for_ratio = cur

    # ---- the wrapped forward --------------------------------------------------------------
    def _route(self, t: float | None) -> tuple[int, _Stream]:
        """Which stream this call belongs to; notices new steps and new runs from the timestep."""
        if t is None or self._last_t is None or t != self._last_t:
            if t is not None and self._last_t is not None and t > self._last_t:
                num_steps = self._num_steps
                self.reset()  # the timestep went back up: a new run began without begin_run()
                self._num_steps = num_steps
            self._call_in_step = 0
        else:
            self._call_in_step += 1  # same timestep again: the next stream (e.g. uncond)
        self._last_t = t
        index = self._call_in_step
        return index, self._streams.setdefault(index, _Stream())

    def _call(self, args: tuple, kwargs: dict) -> Any:
        index, stream = self._route(read_timestep(args, kwargs))
        self.stats["calls"] += 1
        if not self.calibrate:
            compute = self.policy.decide(stream.state, self._num_steps, has_cached=stream.output is not None)
            if not compute:
                self.stats["skipped"] += 1
                return _clone_output(stream.output)
        out = self._original(*args, **kwargs)
        self.stats["computed"] += 1
        if self.calibrate:
            stream.state.step += 1
            if index == 0:  # ratios of the first ("cond") stream; the others track it closely
                self._record_ratio(_main_tensor(out))
        else:
            stream.output = _clone_output(out)
        return out


def step_cache_from_spec(spec: dict | None) -> StepCache | None:
    """``{"threshold":..., "retention_ratio":..., "k":..., "mag_ratios": [...]}`` or ``{"calibrate": true}``."""
    if not spec or spec.get("enabled", True) is False:
        return None
    allowed = {"threshold", "retention_ratio", "k", "mag_ratios", "calibrate", "enabled", "verbose"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"step_cache: unknown keys {unknown} (allowed: {sorted(allowed)})")
    kw = {k: v for k, v in spec.items() if k != "enabled"}
    return StepCache(**kw)
