"""The compose benchmark's cell selection and its profile report (no timing here)."""
from __future__ import annotations

import argparse

from benchmarks import compose, compose_report


def args(ranks=(16, 64), sizes=(1, 3)) -> argparse.Namespace:
    return argparse.Namespace(ranks=list(ranks), sizes=list(sizes))


def test_profiled_cells_are_the_smallest_and_the_largest():
    a = args()
    got = {(r, n) for r in a.ranks for n in a.sizes if compose.profiled(a, r, n)}
    assert got == {(16, 1), (64, 3)}
    one = args(ranks=(16,), sizes=(1,))
    assert compose.profiled(one, 16, 1)


def profile(wall: float, fn: str) -> dict:
    return {"wall_s": wall, "top": [{"function": fn, "calls": 28, "own_s": wall / 2, "cum_s": wall}]}


def test_profile_table_shows_every_profiled_cell():
    result = {"settings": {"blocks": 2},
              "profile_warm_merge": {"r16x1": profile(1.0, "addmm_"), "r64x3": profile(4.0, "copy_")}}
    text = compose_report.profile_table(result)
    assert "r16x1" in text and "r64x3" in text
    assert "| `addmm_` | 28 | 0.500 | 50% |" in text
    assert "| `copy_` | 28 | 2.000 | 50% |" in text


def test_profile_table_reads_a_single_profile_and_none():
    text = compose_report.profile_table({"settings": {"blocks": 2}, "profile_warm_merge": profile(2.0, "sum")})
    assert "largest rank x composition" in text and "| `sum` | 28 | 1.000 | 50% |" in text
    assert compose_report.profile_table({"settings": {"blocks": 2}, "profile_warm_merge": {}}) == \
        "(not profiled in this run)"
