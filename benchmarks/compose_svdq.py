"""The nunchaku part of the compose benchmark: SVDQ stand-in layers of Qwen-Image's real
shapes, our ``targets/svdq.py`` switch against the seed loader's approach.

The seed loader's approach (reimplemented here, it is not in lora_core): on every reset,
unpack the whole packed low-rank branch, cut it back to the base rank and repack; on every
apply, unpack the (base) branch, concatenate the LoRA along the rank axis and repack. Ours
packs only the LoRA and appends its tiles to the base's packed tiles, restores by swapping
the original Parameters back, and (``ComposedModel``) keeps the packed branches of recent
compositions, so a switch back to one swaps Parameters. Two rows: *new composition* (Y
never held by that ComposedModel) and *warm switch* (X <-> Y, both held).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import torch
from torch import nn

from lora_core import Adapter, ModelIndex, plan
from lora_core.compose import ModuleUpdate
from lora_core.nunchaku import pack_lowrank, round_up, unpack_lowrank
from testsupport.lora import nunchaku_qwen_standin
from workers.wrapper import ComposedModel

from .compose_setup import STRENGTHS_X, STRENGTHS_Y, ByteCopy, med, repeat, timed

BASE_RANK = 32


class Backend:
    """The least a ComposedModel needs from a backend."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.device = torch.device("cpu")

    def reset_step_cache(self) -> None:
        pass


def build_tree(blocks: int, dim: int = 3072, mlp: int = 12288) -> nn.Module:
    """nunchaku Qwen-Image's SVDQ layers with their names (``testsupport.lora``'s stand-in
    at real width): fused to_qkv / add_qkv_proj (3072 -> 9216), to_out.0 / to_add_out
    (3072 -> 3072), MLP (3072 -> 12288 -> 3072); rank 32, bf16; no modulation layers.

    The dense fp32 reference weights are dropped to save memory: correctness here is
    checked bit for bit against the seed approach.
    """
    return nunchaku_qwen_standin(dim, mlp, blocks, BASE_RANK, torch.bfloat16, modulation=False,
                                 reference=False).requires_grad_(False)


def without_modulation(a: Adapter) -> Adapter:
    """The same LoRA minus img_mod/txt_mod (an AWQ side path in nunchaku, not SVDQ)."""
    layers = {k: v for k, v in a.layers.items() if not k.endswith("mod.1")}
    return Adapter(MappingProxyType(layers), a.content_id + ":svdq", a.source + " (attn+mlp)", a.scheme)


# ---- the seed loader's approach -----------------------------------------------------------
def _pad_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    return x if x.shape[1] == cols else torch.cat([x, x.new_zeros(x.shape[0], cols - x.shape[1])], 1)


def seed_reset(m: nn.Module, base_rank: int) -> None:
    """Unpack the whole branch, keep the base rank, repack."""
    down = unpack_lowrank(m.proj_down.data, down=True)[:base_rank]
    up = unpack_lowrank(m.proj_up.data, down=False)[:, :base_rank]
    m.proj_down = nn.Parameter(pack_lowrank(down, down=True), requires_grad=False)
    m.proj_up = nn.Parameter(pack_lowrank(up, down=False), requires_grad=False)
    m.rank = base_rank


def seed_apply(m: nn.Module, u: ModuleUpdate) -> None:
    """Unpack the branch, concatenate the LoRA along rank, repack."""
    rank = int(m.rank)
    down = unpack_lowrank(m.proj_down.data, down=True)[:rank]  # (rank, in_pad)
    up = unpack_lowrank(m.proj_up.data, down=False)[:, :rank]  # (out_pad, rank)
    a = _pad_cols(u.A.to(down.dtype), down.shape[1])
    b = u.B.to(up.dtype)
    b = torch.cat([b, b.new_zeros(up.shape[0] - b.shape[0], b.shape[1])], 0)
    m.proj_down = nn.Parameter(pack_lowrank(torch.cat([down, a], 0), down=True), requires_grad=False)
    m.proj_up = nn.Parameter(pack_lowrank(torch.cat([up, b], 1), down=False), requires_grad=False)
    m.rank = round_up(rank + u.rank)


class SeedLoader:
    """Switch = plan (our composition math) + reset every touched layer + apply the new one."""

    def __init__(self, tree: nn.Module):
        self.index = ModelIndex(tree)
        self.base = {n: int(m.rank) for n, m in self.index.modules.items()}
        self.touched: list[str] = []

    def switch(self, pairs: Sequence[tuple[Adapter, float]]) -> None:
        updates = plan(pairs, self.index)
        with torch.no_grad():
            self.reset()
            for name, u in updates.items():
                seed_apply(self.index.modules[name], u)
        self.touched = list(updates)

    def reset(self) -> None:
        with torch.no_grad():
            for name in self.touched:
                seed_reset(self.index.modules[name], self.base[name])
        self.touched = []


def held_branches(tree: nn.Module) -> list[torch.Tensor]:
    """The packed proj_down/proj_up of every SVDQ module holding a composition (rank above the
    base): what a first switch must write whatever its method, base tiles included, since
    nunchaku's kernel reads each factor as one tensor."""
    return [t for m in ModelIndex(tree).modules.values() if int(m.rank) != BASE_RANK for t in (m.proj_down, m.proj_up)]


# ---- the scenarios ------------------------------------------------------------------------
def _same(a: nn.Module, b: nn.Module) -> bool:
    ia, ib = ModelIndex(a), ModelIndex(b)
    return all(
        int(ia.modules[n].rank) == int(ib.modules[n].rank)
        and torch.equal(ia.modules[n].proj_down, ib.modules[n].proj_down)
        and torch.equal(ia.modules[n].proj_up, ib.modules[n].proj_up)
        for n in ia.modules
    )


def run_svdq(blocks: int, adapters_by_rank: Mapping[int, list[Adapter]], sizes: Sequence[int], repeats: int) -> list[dict]:
    import copy

    ours_tree = build_tree(blocks)
    seed_tree = copy.deepcopy(ours_tree)
    cm = ComposedModel(Backend(ours_tree), lora_mode="merge")
    seed = SeedLoader(seed_tree)
    out = []
    for rank, full in adapters_by_rank.items():
        ads = [without_modulation(a) for a in full]
        for n in sizes:
            X = [(ads[i], STRENGTHS_X[i]) for i in range(n)]
            Y = [(ads[3 + i], STRENGTHS_Y[i]) for i in range(n)]
            out += _one(cm, seed, ours_tree, seed_tree, X, Y, rank, n, repeats, blocks)
            cm.reset()
            seed.reset()
    return out


def _one(cm, seed, ours_tree, seed_tree, X, Y, rank, n, repeats, blocks) -> list[dict]:
    def ours_to(pairs, model=cm):
        model.want(pairs)
        model.ensure()

    # new composition: Y never held by this ComposedModel (plan, pack Y's LoRA, append tiles)
    t_new = []
    cm.reset()
    for _ in range(repeats):
        fresh = ComposedModel(Backend(ours_tree), lora_mode="merge")
        ours_to(X, fresh)
        t_new.append(timed(lambda: ours_to(Y, fresh)))
        fresh.reset()
    ours_to(Y)  # warm: both compositions held once before the timed switches
    ours_to(X)
    seed.switch(X)
    t_ours, t_seed, cur = [], [], X
    for _ in range(repeats):
        cur = Y if cur is X else X
        t_ours.append(timed(lambda: ours_to(cur)))
        t_seed.append(timed(lambda: seed.switch(cur)))
    if cur is not Y:
        ours_to(Y)
        seed.switch(Y)
    ok = _same(ours_tree, seed_tree)
    floor = ByteCopy([t for a, _ in Y for l in a.layers.values() for t in (l.A, l.B)])
    t_floor = repeat(floor, repeats)
    branch = ByteCopy(held_branches(ours_tree))  # ours holds Y: the packed branches it must have written
    t_branch = repeat(branch, repeats)
    # restore: ours swaps the original Parameters back; the seed unpacks and repacks every layer
    r_ours, r_seed = [], []
    for _ in range(repeats):
        r_ours.append(timed(cm.reset))
        r_seed.append(timed(seed.reset))
        ours_to(Y)
        seed.switch(Y)
    r_ok = _same(ours_tree, seed_tree)
    cm.reset()
    seed.reset()
    r_ok = r_ok and _same(ours_tree, seed_tree)
    common = {"mode": "svdq", "rank": rank, "loras": n, "blocks": blocks, "peer": "seed loader (unpack-concat-repack)"}
    check = {"ok": ok, "what": "packed proj_down/proj_up/rank bit-identical to the seed approach"}
    return [
        dict(common, scenario="new composition", ours_s=med(t_new), peer_s=med(t_seed), floor_s=med(t_floor),
             floor_kind="copy LoRA bytes", floor_parts={"copy_lora_bytes_s": med(t_floor), "lora_bytes": floor.nbytes,
                                                        "write_branch_s": med(t_branch), "branch_bytes": branch.nbytes},
             ours_samples=t_new, peer_samples=t_seed, check=check),
        dict(common, scenario="warm switch", ours_s=med(t_ours), peer_s=med(t_seed), floor_s=med(t_floor),
             floor_kind="copy LoRA bytes", floor_parts={"copy_lora_bytes_s": med(t_floor), "lora_bytes": floor.nbytes},
             ours_samples=t_ours, peer_samples=t_seed, check=check),
        dict(common, scenario="restore", ours_s=med(r_ours), peer_s=med(r_seed), floor_s=None, floor_kind="-",
             floor_parts={}, ours_samples=r_ours, peer_samples=r_seed,
             check={"ok": r_ok, "what": "both back to the original packed bytes"}),
    ]
