"""The MagCache-style step cache: the pure policy, then calibrate-and-skip on the real tiny model."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from workers.backends import RenderRequest, make_backend
from workers.backends.tiny import TINY_MAG_RATIOS
from workers.stepcache import MagCachePolicy, SkipState, StepCache, nearest_interp

STEPS = 8
PROMPTS = [("a cat in the rain", 1), ("a red fox on a hill at sunset", 7), ("a photo of a dog", 3)]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def mean_abs_diff(a, b) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def tiny():
    return make_backend({"backend": "tiny"}, device="cpu")


@pytest.fixture(scope="module")
def ratios(tiny):
    """Calibrate once on the tiny model, over three prompts, then detach."""
    cache = tiny.set_step_cache({"calibrate": True, "verbose": False})
    tiny.render([RenderRequest(p, seed=s, steps=STEPS) for p, s in PROMPTS])
    tiny.set_step_cache(None)
    assert len(cache.calibrations) == len(PROMPTS)
    return cache.calibrated_ratios()


# ---- the pure policy ----------------------------------------------------------------------
def run_policy(policy: MagCachePolicy, steps: int) -> list[bool]:
    state = SkipState()
    return [policy.decide(state, steps) for _ in range(steps)]


def test_policy_skips_while_error_is_small_and_at_most_k_in_a_row():
    flat = MagCachePolicy([1.0] * 10, threshold=0.1, retention_ratio=0.2, k=2)
    # retention: int(0.2 * 10 + 0.5) = 2 steps always computed; then 2 skips, 1 compute, ...
    assert run_policy(flat, 10) == [True, True, False, False, True, False, False, True, False, False]
    no_skip = MagCachePolicy([1.0] * 10, threshold=0.1, retention_ratio=0.2, k=0)
    assert all(run_policy(no_skip, 10))


def test_policy_error_accumulates_until_threshold():
    # Each step drifts 5 %: the error after 1 skip is 0.05, after 2 skips 0.05 + 0.0975.
    policy = MagCachePolicy([0.95] * 6, threshold=0.1, retention_ratio=0.0, k=5)
    state = SkipState()
    assert policy.decide(state) is True  # step 0: nothing cached yet
    assert policy.decide(state) is False and state.acc_err == pytest.approx(0.05)
    assert policy.decide(state) is True  # 0.1475 >= 0.1: compute and reset
    assert (state.acc_ratio, state.acc_err, state.acc_steps) == (1.0, 0.0, 0)


def test_policy_never_skips_without_a_cached_output():
    policy = MagCachePolicy([1.0] * 4, threshold=1.0, retention_ratio=0.0, k=4)
    state = SkipState()
    assert all(policy.decide(state, has_cached=False) for _ in range(4))


def test_policy_resamples_ratios_to_the_run_length():
    assert nearest_interp([1.0, 2.0, 3.0], 5) == [1.0, 2.0, 2.0, 3.0, 3.0]
    assert nearest_interp([1.0, 2.0, 3.0], 1) == [3.0]
    policy = MagCachePolicy([1.0, 0.9, 0.8, 0.7], threshold=0.06)
    assert policy.ratios_for(8) == nearest_interp([1.0, 0.9, 0.8, 0.7], 8)
    assert policy.ratios_for(None) == [1.0, 0.9, 0.8, 0.7]


def test_bad_settings_are_all_reported():
    with pytest.raises(ValueError) as err:
        MagCachePolicy([], threshold=-1, retention_ratio=2, k=-1)
    for word in ("mag_ratios", "threshold", "retention_ratio", "k:"):
        assert word in str(err.value)
    with pytest.raises(ValueError, match="calibrate=True"):
        StepCache()


# ---- StepCache on a small real module -----------------------------------------------------
class Denoiser(torch.nn.Module):
    """A real (tiny) module with a transformer-style signature: (hidden_states, timestep)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep=None, return_dict=False):
        return (self.proj(hidden_states) * timestep[:, None],)


def test_step_cache_routes_streams_and_notices_a_new_run():
    model = Denoiser()
    cache = StepCache(mag_ratios=[1.0] * 4, threshold=1.0, retention_ratio=0.0, k=3).attach(model)
    x = torch.ones(1, 4)
    for t in (1.0, 0.75, 0.5):  # cond + uncond per step, same timestep
        model(x, timestep=torch.tensor([t]))
        model(x, timestep=torch.tensor([t]))
    assert sorted(cache._streams) == [0, 1]
    assert cache.stats == {"calls": 6, "computed": 2, "skipped": 4}
    out = model(x, timestep=torch.tensor([1.0]))[0]  # the timestep went up: a new run, computed
    assert cache.stats["computed"] == 3 and torch.equal(out, model.proj(x) * 1.0)
    cache.reset()
    assert cache._streams == {} and cache._last_t is None
    cache.detach()
    assert "forward" not in vars(model)


def test_skipped_outputs_are_copies():
    model = Denoiser()
    StepCache(mag_ratios=[1.0] * 4, threshold=1.0, retention_ratio=0.0, k=3).attach(model)
    x = torch.ones(1, 4)
    first = model(x, timestep=torch.tensor([1.0]))[0]
    skipped = model(x, timestep=torch.tensor([0.5]))[0]
    skipped.mul_(0)  # a caller modifying the result must not corrupt the cache
    assert torch.equal(model(x, timestep=torch.tensor([0.25]))[0], first)


# ---- calibrate and skip on the tiny model -------------------------------------------------
def test_calibration_prints_a_list_to_paste(tiny, capsys):
    cache = tiny.set_step_cache({"calibrate": True})
    try:
        tiny.render([RenderRequest("a cat in the rain", seed=1, steps=4)])
    finally:
        tiny.set_step_cache(None)
    err = capsys.readouterr().err
    assert "mag_ratios" in err and str(cache.calibrations[0]) in err
    assert cache.stats["skipped"] == 0 and len(cache.calibrations[0]) == 4
    assert cache.calibrations[0][0] == 1.0


class Timer:
    """Wall time of a render and of the transformer calls inside it (hooks around the call)."""

    def __init__(self, module: torch.nn.Module):
        self.transformer_s = 0.0
        module.register_forward_pre_hook(lambda *_: self._add(-time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(time.perf_counter()))

    def _add(self, t: float) -> None:
        self.transformer_s += t

    def best_of(self, fn, repeats: int = 3) -> tuple[float, float, object]:
        """min over repeats: this box is shared, and the minimum is the least disturbed run."""
        walls, inner = [], []
        for _ in range(repeats):
            self.transformer_s = 0.0
            t0 = time.perf_counter()
            out = fn()
            walls.append(time.perf_counter() - t0)
            inner.append(self.transformer_s)
        return min(walls), min(inner), out


def test_cache_skips_transformer_calls_and_stays_close(tiny, ratios):
    assert len(ratios) == STEPS and ratios[0] == 1.0
    print(f"\ncalibrated tiny mag_ratios ({STEPS} steps): {ratios}")
    assert ratios == pytest.approx(TINY_MAG_RATIOS, abs=1e-3)  # the published constant is still true
    req = [RenderRequest("a green owl in a forest at night", seed=11, steps=STEPS)]
    model = make_backend({"backend": "tiny"}, device="cpu")  # own hooks, not on the shared fixture
    timer = Timer(model.transformer)
    model.render(req)  # warm-up
    plain_s, plain_tr, plain = timer.best_of(lambda: model.render(req)[0])
    cache = model.set_step_cache({"mag_ratios": ratios, "threshold": 0.1, "retention_ratio": 0.2, "k": 2})
    cached_s, cached_tr, cached = timer.best_of(lambda: model.render(req)[0])
    diff = mean_abs_diff(plain, cached)
    print(f"step cache: {cache.stats} over 3 runs; transformer {plain_tr * 1e3:.1f} -> {cached_tr * 1e3:.1f} ms, "
          f"render {plain_s:.3f} -> {cached_s:.3f} s, mean |pixel diff| {diff:.3f}/255")
    assert cache.stats["calls"] == 3 * STEPS
    # the trained model's ratios drift by 5% a step: steps 2, 4, 6 of 8 skipped (retention 2, k 2,
    # the drift accumulated over two steps passes the threshold 0.1 each time)
    assert cache.stats["skipped"] == 3 * 3
    assert 0 < diff < 10.0  # a mean of 7.3/255 when measured: three of eight steps reused
    assert cached_tr < plain_tr  # half the calls; the bound is loose: timing on a shared box


def test_cache_with_true_cfg_skips_each_stream(tiny, ratios):
    cache = tiny.set_step_cache({"mag_ratios": ratios, "threshold": 0.1, "k": 2})
    try:
        tiny.render([RenderRequest("a cat", negative_prompt="blurry", guidance=3.0, seed=1, steps=STEPS)])
    finally:
        tiny.set_step_cache(None)
    assert cache.stats["calls"] == 2 * STEPS
    assert cache.stats["skipped"] % 2 == 0 and cache.stats["skipped"] >= 4  # cond and uncond alike


def test_no_state_leaks_from_one_run_into_the_next(tiny, ratios):
    settings = {"mag_ratios": ratios, "threshold": 0.1, "retention_ratio": 0.0, "k": 3}
    a = RenderRequest("a cat in the rain", seed=1, steps=STEPS)
    b = RenderRequest("a red fox on a hill at sunset", seed=7, steps=STEPS)
    # Fresh cache, run B alone.
    tiny.set_step_cache(settings)
    fresh_b = tiny.render([b])[0]
    # Run A, then a "composition change" resets the cache, then run B.
    cache = tiny.set_step_cache(settings)
    tiny.render([a])
    tiny.reset_step_cache()
    assert cache._streams == {} and cache._last_t is None
    after_a = tiny.render([b])[0]
    # Even with no reset at all (a pipeline driven directly), the rising timestep starts a new run.
    cache.reset()
    tiny.pipe(prompt=a.prompt, num_inference_steps=STEPS, width=256, height=256, true_cfg_scale=1.0,
              generator=torch.Generator().manual_seed(1))
    direct_b = tiny.pipe(prompt=b.prompt, num_inference_steps=STEPS, width=256, height=256, true_cfg_scale=1.0,
                         generator=torch.Generator().manual_seed(7)).images[0]
    tiny.set_step_cache(None)
    assert np.array_equal(pixels(after_a), pixels(fresh_b))
    # direct_b has no begin_run(num_steps): ratios are used as calibrated (same length here).
    assert np.array_equal(pixels(direct_b), pixels(fresh_b))


def test_detach_restores_the_uncached_model(tiny):
    plain = tiny.render([RenderRequest("a cat", seed=5, steps=4)])[0]
    tiny.set_step_cache({"mag_ratios": [1.0] * 4, "threshold": 1.0, "retention_ratio": 0.0, "k": 3})
    tiny.set_step_cache(None)
    assert "forward" not in vars(tiny.transformer)
    assert np.array_equal(pixels(tiny.render([RenderRequest("a cat", seed=5, steps=4)])[0]), pixels(plain))
