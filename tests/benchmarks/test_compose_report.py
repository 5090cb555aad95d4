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


def images_result(peft_branch: float) -> dict:
    """A result with the switch + N images cells, built by the benchmark's own ``cells``."""
    from benchmarks import compose_images as I

    def term(s):
        return {"full_s": s, "scaling_ok": True, "cpu": {"full_s": s / 2}}

    rows = {"merge/warm_switch/r16x1": {"ours_s": 2.0, "peer_s": 30.0},
            "lowrank/new_composition/r16x1": {"ours_s": 0.05, "peer_s": 0.02}}
    costs = {"r16x1": {"ours": term(0.01), "peft": term(peft_branch), "check": {"ok": True}}}
    cells = I.cells(rows, {"full_s": 1.0}, costs, 50, (1, 4, 16), blocks=2)
    base = {"full_s": 1.0, "attention_full_s": 0.1, "per_token_spread": 1.3, "scaling_ok": True,
            "cpu": {"full_s": 0.5, "per_token_spread": 1.05}}
    return {"settings": {"blocks": 2}, "images": {
        "settings": {"image_tokens": 4096, "text_tokens": 128, "steps": 50, "images": [1, 4, 16],
                     "step_divisors": [128, 64], "scaling_tolerance": 0.15, "hysteresis": 0.02},
        "base_step": base, "cells": cells, "targets": I.summary(cells)}}


def test_images_tables_render_every_n_and_the_targets():
    text = compose_report.images_tables(images_result(peft_branch=0.02))
    for n in (1, 4, 16):
        assert f"| r16x1 | {n} |" in text
    # crossover (2 - 0.05) / (50 x 0.01) = 3.9 images: at N = 1 the branch (25.3 s/block) beats merging
    # (2 + 50 x 1 s = 52 s for 2 blocks = 26 s/block) and auto takes it; at N = 4 auto merges
    assert "| r16x1 | 1 | 26 | 25.3 | 25.3 (lowrank) |" in text and "| 101 (merge) |" in text
    assert "ours auto <= PEFT's cheaper mode: **met**" in text and "| 3.9 |" in text
    assert "Merging beats our branch for N above the crossover" in text
    assert "4096 image tokens + 128 text tokens, 50 steps" in text


def test_images_tables_say_when_peft_is_cheaper_and_when_not_run():
    text = compose_report.images_tables(images_result(peft_branch=0.001))
    assert "ours lowrank <= PEFT unfused: **not met**" in text and "**no**" in text
    assert compose_report.images_tables({"settings": {"blocks": 2}, "images": None}).startswith("(not run")
