"""Merging under a memory budget: the pure plan, and exact merges under both strategies."""
from __future__ import annotations

import pytest
import torch

import lora_core
from testsupport import lora as T
from lora_core.targets.budget import BudgetState, plan_merge

from .conftest import assert_same, snapshot
from .test_merge import check_merged, expected

MB = 1 << 20


def test_plan_has_room():
    p = plan_merge(free=100 * MB, scratch=10 * MB, backup=5 * MB, reserve=10 * MB, strategy="keep_until_full", device_backups=0)
    assert (p.compute_on_device, p.backup_on_device, p.offload_bytes) == (True, True, 0)


def test_plan_keep_until_full_spills_backups_then_falls_back_to_cpu():
    p = plan_merge(free=22 * MB, scratch=10 * MB, backup=5 * MB, reserve=10 * MB, strategy="keep_until_full", device_backups=50 * MB)
    assert (p.compute_on_device, p.backup_on_device, p.offload_bytes) == (True, False, 0)
    p = plan_merge(free=15 * MB, scratch=10 * MB, backup=5 * MB, reserve=10 * MB, strategy="keep_until_full", device_backups=0)
    assert not p.compute_on_device and not p.backup_on_device


def test_plan_rotate_offloads_oldest_to_keep_new_backup_on_device():
    p = plan_merge(free=22 * MB, scratch=10 * MB, backup=5 * MB, reserve=10 * MB, strategy="rotate", device_backups=50 * MB)
    assert p.backup_on_device and p.compute_on_device and p.offload_bytes == 3 * MB
    p = plan_merge(free=22 * MB, scratch=10 * MB, backup=5 * MB, reserve=10 * MB, strategy="rotate", device_backups=1 * MB)
    assert not p.backup_on_device and p.offload_bytes == 0, "not enough to rotate: spill like keep_until_full"
    with pytest.raises(ValueError):
        plan_merge(1, 1, 1, 1, "bogus", 0)


@pytest.mark.parametrize("strategy", ["keep_until_full", "rotate"])
@pytest.mark.parametrize("free_mb", [1000, 0])
def test_budgeted_merge_is_exact_and_restores(qwen, tmp_path, strategy, free_mb):
    layers = T.random_layers(T.linear_shapes(qwen, ("attn.", "img_mlp")), rank=4, seed=31)
    path = T.write_safetensors(tmp_path / "l.safetensors", T.peft_state_dict(layers))
    want = expected(qwen, [(layers, 0.6)])
    budget = BudgetState(reserve_bytes=10 * MB, strategy=strategy, free_bytes=lambda device: free_mb * MB)
    snap = snapshot(qwen)
    h = lora_core.apply(qwen, [(path, 0.6)], budget=budget)
    check_merged(qwen, want)
    n = len(layers)
    if free_mb:
        assert budget.stats["device_backups"] == n and budget.stats["cpu_fallbacks"] == 0
    else:
        assert budget.stats["cpu_fallbacks"] == n and budget.stats["cpu_backups"] == n
    h.restore()
    assert_same(qwen, snap)
    assert not budget.backups
