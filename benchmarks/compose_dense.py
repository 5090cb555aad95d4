"""The dense part of the compose benchmark: our switch against diffusers + PEFT on one
real-width Qwen-Image transformer (bf16, few blocks), the same files, the same run.

One repetition of the merge cycle, per configuration: base -> X from the files (cold) ->
Y with every adapter in memory (warm switch) -> base (restore). Ours goes through the
farm's ``ComposedModel`` (``load_adapter`` + ``want`` + ``ensure``, which calls
``lora_core.switch``: modules both compositions touch are rewritten from their kept
original, no restore pass); the peer through ``load_lora_weights``' two calls +
``set_adapters`` + ``fuse_lora``, then ``unfuse_lora`` + ``set_adapters`` + ``fuse_lora``.
Ours, the peer and the floor are measured in turn, so a change in the machine's load lands
on all three alike. Restore: ours ``ComposedModel.reset`` (Y -> base, a copy from the kept
originals), PEFT's ``unfuse_lora`` (timed inside its warm switch).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

import lora_core
from lora_core import Adapter
from workers.wrapper import ComposedModel

from . import compose_setup as S
from .compose_svdq import Backend

CHECK_MODULE = "transformer_blocks.0.attn.to_q"


class Dense:
    """Both models and what the scenarios share."""

    def __init__(self, ours: nn.Module, peer: nn.Module, names: Sequence[str], blocks: int, repeats: int,
                 merge_repeats: int):
        self.ours, self.peer, self.names = ours, peer, list(names)
        self.blocks, self.repeats, self.merge_repeats = blocks, repeats, merge_repeats
        self.floors = S.Floors(ours, names)
        self.base_fp = S.fingerprint(ours, names)
        self.check_base = ours.get_submodule(CHECK_MODULE).weight.detach().clone()
        self.block0 = [n for n in names if n.startswith("transformer_blocks.0.")]

    # ---- helpers ------------------------------------------------------------------------
    def row(self, scenario: str, mode: str, rank: int, n: int, ours: list, peer: list, floor: list | float | None,
            floor_kind: str, floor_parts: dict, check: dict, **extra) -> dict:
        floor_s = S.med(floor) if isinstance(floor, list) else floor
        return dict({
            "scenario": scenario, "mode": mode, "rank": rank, "loras": n, "blocks": self.blocks,
            "peer": "diffusers + PEFT", "ours_s": S.med(ours), "peer_s": S.med(peer), "floor_s": floor_s,
            "floor_kind": floor_kind, "floor_parts": floor_parts, "ours_samples": ours, "peer_samples": peer,
            "check": check,
        }, **extra)

    def peer_drop(self, names: Sequence[str]) -> None:
        """Untimed: the peer back on our base weights, unmerged, without the given adapters."""
        S.peer_forget_merge(self.peer, self.ours, self.names)
        self.peer.delete_adapters(list(names))

    def peer_clean(self) -> None:
        """Peer back to a bare model with our weights (ours must be at base: bit-exact)."""
        if getattr(self.peer, "peft_config", None):
            self.peer.unload_lora()
        S.peer_resync(self.peer, self.ours, self.names)

    def terms(self, pairs, module: str) -> list:
        return [(a.layers[module].A, a.layers[module].B, a.layers[module].alpha, s) for a, s in pairs]

    def merge_floor(self, total_rank: int, samples: dict) -> dict:
        """One sample of each floor part into ``samples``; returns the parts' medians so far."""
        samples.setdefault("copy", []).append(S.timed(self.floors.copy_weights))
        samples.setdefault("mm32", []).append(self.floors.mm(total_rank, torch.float32, 1))
        c, m = S.med(samples["copy"]), S.med(samples["mm32"])
        return {"copy_weights_s": c, "mm_fp32_s": m, "floor_s": max(c, m)}

    # ---- scenarios ----------------------------------------------------------------------
    def merge_cycle(self, paths: list[str], X: list[tuple[Adapter, float]], Y: list[tuple[Adapter, float]],
                    py: list[str], rank: int, profile: bool = False) -> list[dict]:
        """Cold (files -> X), warm switch (X -> Y), restore inside it; rows for all three."""
        n, reps = len(X), self.merge_repeats
        wx, wy = [s for _, s in X], [s for _, s in Y]
        cm = ComposedModel(Backend(self.ours), lora_mode="merge")
        c_ours, c_peer, t_ours, t_peer, r_ours, r_peer, t_read, fl = [], [], [], [], [], [], [], {}
        checks: dict = {}
        extra: dict = {}
        for i in range(reps):
            px = [f"cold{i}_{j}" for j in range(n)]
            box = []

            def ours_cold():
                ads = [lora_core.load_adapter(p) for p in paths]
                box.append(list(zip(ads, wx)))
                cm.want(box[0])
                cm.ensure()

            def peer_cold():
                for p, nm in zip(paths, px):
                    S.peer_load(self.peer, p, nm)
                self.peer.set_adapters(px, wx)
                self.peer.fuse_lora(adapter_names=px)

            c_ours.append(S.timed(ours_cold))
            c_peer.append(S.timed(peer_cold))
            if i == 0:
                checks["cold"] = dict(S.compare_weights(self.ours, self.peer, self.block0, n + 1), modules="block 0")
            prof = __import__("cProfile").Profile() if (profile and i == 0) else None
            cm.want(Y)
            t0 = time.perf_counter()
            cm.ensure() if prof is None else prof.runcall(cm.ensure)
            t_ours.append(time.perf_counter() - t0)
            if prof is not None:
                extra["profile"] = profile_rows(prof, t_ours[-1])
            t_un = S.timed(self.peer.unfuse_lora)

            def peer_fuse_y():
                self.peer.set_adapters(py, wy)
                self.peer.fuse_lora(adapter_names=py)

            t_peer.append(t_un + S.timed(peer_fuse_y))
            r_peer.append(t_un)
            parts = self.merge_floor(n * rank, fl)
            t_read.append(S.timed(lambda: S.read_files(paths)))
            if i == 0:  # both at Y: the peer has rounded 3n times (fuse X, unfuse X, fuse Y), ours once
                check = S.compare_weights(self.ours, self.peer, self.names, 3 * n + 1)
                ref = S.reference_check(self.ours, self.check_base, CHECK_MODULE, self.terms(Y, CHECK_MODULE))
                checks["warm"] = dict(check, ok=check["ok"] and ref["ok"], fp64_reference=ref)
                # PEFT's restore is a subtraction: what it leaves on one layer after fuse X, unfuse X, fuse Y, unfuse Y
                self.peer.get_submodule(CHECK_MODULE).unmerge()
                drift = float((S.peer_weight(self.peer, CHECK_MODULE).float() - self.check_base.float()).abs().max())
            r_ours.append(S.timed(cm.reset))
            self.peer_drop(px)
        exact = S.fingerprint(self.ours, self.names) == self.base_fp
        parts["mm_bf16_s_extrapolated"] = self.floors.mm(n * rank, torch.bfloat16, 1, rows=128)
        parts["applies"] = "max(copy, fp32 mm): our merge (and PEFT's on CPU) multiplies in fp32"
        read_s = S.med(t_read)
        cold = self.row("cold", "merge", rank, n, c_ours, c_peer, parts["floor_s"] + read_s,
                        "read files + max(copy, fp32 mm)", dict(parts, read_files_s=read_s), checks["cold"])
        warm = self.row("warm switch", "merge", rank, n, t_ours, t_peer, parts["floor_s"], "max(copy, fp32 mm)",
                        parts, checks["warm"], **extra)
        restore = self.row("restore", "merge", rank, n, r_ours, r_peer, parts["copy_weights_s"],
                           "copy touched weights", {"copy_weights_s": parts["copy_weights_s"]},
                           {"ok": exact, "ours_bit_exact": exact, "peft_max_abs_drift_after_unfuse": drift,
                            "drift_module": CHECK_MODULE})
        return [cold, warm, restore]

    def lowrank(self, X, Y, px, py, rank: int) -> list[dict]:
        """Runtime low-rank branch. Ours: ``ComposedModel(lora_mode="lowrank")``; PEFT (unfused)
        ``set_adapters``. Two rows: *new composition* (Y never held before: plan in the module's dtype and
        check the branch tensors, swap them in) and *warm switch* (X <-> Y, both held: ours
        swaps prepared tensors; PEFT's call is the same either way)."""
        n, reps = len(X), self.repeats
        wx, wy = [s for _, s in X], [s for _, s in Y]

        def ours_to(cm, pairs):
            cm.want(pairs)
            cm.ensure()

        floor = S.ByteCopy([t for a, _ in Y for l in a.layers.values() for t in (l.A, l.B)])
        t_new, t_ours, t_peer, t_floor = [], [], [], []
        for i in range(reps):
            fresh = ComposedModel(Backend(self.ours), lora_mode="lowrank")
            ours_to(fresh, X)
            t_new.append(S.timed(lambda: ours_to(fresh, Y)))
            fresh.reset()
        cm = ComposedModel(Backend(self.ours), lora_mode="lowrank")
        ours_to(cm, Y)
        ours_to(cm, X)
        self.peer.set_adapters(px, wx)
        for i in range(reps):
            to_y = i % 2 == 0
            t_ours.append(S.timed(lambda: ours_to(cm, Y if to_y else X)))
            t_peer.append(S.timed(lambda: self.peer.set_adapters(py if to_y else px, wy if to_y else wx)))
            t_floor.append(S.timed(floor))
        if reps % 2 == 0:
            ours_to(cm, Y)
            self.peer.set_adapters(py, wy)
        check = S.lowrank_check(self.ours, self.peer, self.block0, lambda m: self.terms(Y, m))
        cm.reset()
        parts = {"copy_lora_bytes_s": S.med(t_floor), "lora_bytes": floor.nbytes}
        return [
            self.row("new composition", "lowrank", rank, n, t_new, t_peer, t_floor, "copy LoRA bytes", parts, check),
            self.row("warm switch", "lowrank", rank, n, t_ours, t_peer, t_floor, "copy LoRA bytes", parts, check),
        ]


def profile_rows(prof, wall: float, top: int = 12) -> dict:
    """The top entries of a cProfile run by own time."""
    import os
    import pstats

    rows = []
    for (file, line, fn), (_, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
        where = fn if file == "~" else f"{os.path.relpath(file) if file.startswith(os.getcwd()) else os.path.basename(file)}:{line}({fn})"
        rows.append({"function": where, "calls": nc, "own_s": tt, "cum_s": ct})
    rows.sort(key=lambda r: -r["own_s"])
    return {"wall_s": wall, "top": rows[:top]}
