"""The dense merge's finite check by bound (``dense.max_abs`` / ``merge_rows(src_max_abs=)``):
whenever the bound cannot rule NaN and Inf out, the elementwise check still runs and raises."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_core.compose import ModuleUpdate
from lora_core.errors import NonFiniteError
from lora_core.targets import dense
from lora_core.targets.ledger import Ledger


def linear(dtype: torch.dtype, fill: float | None = None, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(64, 48, bias=False).to(dtype).requires_grad_(False)
    m.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
    if fill is not None:
        m.weight[3, 5] = fill
    return m


def update(scale: float, rank: int = 4, seed: int = 1) -> ModuleUpdate:
    g = torch.Generator().manual_seed(seed)
    return ModuleUpdate("m", "linear", torch.randn(rank, 64, generator=g), torch.randn(48, rank, generator=g) * scale)


def test_max_abs_is_memoized_per_version_and_keeps_nan():
    t = torch.tensor([0.5, -3.0, 2.0], dtype=torch.bfloat16)
    assert dense.max_abs(t) == 3.0
    t[0] = 7.0  # an in-place edit: the memo is stale
    assert dense.max_abs(t) == 7.0
    t[1] = float("nan")
    assert dense.max_abs(t) != dense.max_abs(t)  # NaN
    assert dense.max_abs(torch.zeros(0)) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_by_bound_gives_the_checked_result_bit_for_bit(dtype):
    m, u = linear(dtype), update(0.05)
    want = torch.empty_like(m.weight)
    dense.merge_rows(want, m.weight, u)  # no bound: the elementwise check
    originals: dict = {}
    dense.merge(m, u, Ledger(), originals)
    assert torch.equal(m.weight, want)
    dense.remerge(m, update(0.02, seed=2), originals)
    again = torch.empty_like(want)
    dense.merge_rows(again, originals["m"], update(0.02, seed=2))
    assert torch.equal(m.weight, again)


@pytest.mark.parametrize("fill", [float("inf"), float("nan")])
def test_a_non_finite_original_is_still_refused(fill):
    m = linear(torch.bfloat16, fill)
    before = m.weight.clone()
    with pytest.raises(NonFiniteError):
        dense.merge(m, update(0.05), Ledger(), {})
    assert torch.equal(m.weight.view(torch.int16), before.view(torch.int16))


def test_fp16_overflow_from_a_large_finite_original_is_caught_on_merge_and_on_remerge():
    """60000 is finite in fp16; adding ~1e4 makes it Inf only when stored. Neither the
    original alone nor the product alone is out of range: the bound must add both."""
    m = linear(torch.float16, 60000.0)
    u = ModuleUpdate("m", "linear", torch.zeros(1, 64), torch.zeros(48, 1))
    u.A[0, 5], u.B[3, 0] = 100.0, 100.0  # +1e4 on the large element
    with pytest.raises(NonFiniteError):
        dense.merge(m, u, Ledger(), {})
    originals: dict = {}
    dense.merge(m, update(0.001), Ledger(), originals)  # small: fine
    with pytest.raises(NonFiniteError):
        dense.remerge(m, u, originals)
    assert torch.equal(m.weight, originals["m"])  # back at the original after the refused remerge


def test_merge_under_inference_mode_and_into_an_empty_weight():
    # an inference tensor keeps no version counter: its max is computed, not memoized
    m, ref = linear(torch.bfloat16), linear(torch.bfloat16)
    with torch.inference_mode():
        dense.merge(m, update(0.1), Ledger(), {})
    dense.merge(ref, update(0.1), Ledger(), {})
    assert torch.equal(m.weight, ref.weight)
    with torch.inference_mode():
        t = torch.tensor([1.0, -4.0])
        assert dense.max_abs(t) == 4.0 and dense.max_abs(t) == 4.0
    # no output rows: a no-op merge, as before the bound
    empty = nn.Linear(64, 1, bias=False)
    empty.weight = nn.Parameter(torch.zeros(0, 64), requires_grad=False)
    dense.merge(empty, ModuleUpdate("m", "linear", torch.randn(4, 64), torch.zeros(0, 4)), Ledger(), {})
    assert empty.weight.shape == (0, 64)
