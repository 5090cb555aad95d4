"""Benchmark of the LoRA switch: ours against diffusers + PEFT, and against the floor.

    python -m benchmarks.compose --json [--blocks 2] [--repeats 3] [--threads 1]
        [--ranks 16 64] [--sizes 1 3] [--modes merge lowrank svdq images] [--no-write]
        [--images 1 4 16] [--steps 50] [--text-tokens 128] [--step-divisors 128 64] [--branch-divisors 2 1]

Model: diffusers ``QwenImageTransformer2DModel`` at Qwen-Image's real width (its installed
defaults: 24 heads x 128 = 3072, MLP 12288, joint_attention_dim 3584) with ``--blocks``
blocks, bf16, random weights. LoRAs: PEFT-format files (``transformer.<module>.lora_A.weight``
+ ``.alpha``, alpha = rank/2) covering the attention, MLP and modulation linears of every
block, ranks 16 and 64, compositions of 1 and 3. In one run, per scenario, it times:

* merge, cold: file -> composition merged. Ours ``lora_core.apply(model, [(path, s), ...])``;
  PEFT: ``lora_state_dict`` + ``load_lora_into_transformer`` per file (what
  ``pipe.load_lora_weights`` does) + ``set_adapters`` + ``fuse_lora``.
* merge, warm switch X -> Y with the adapters already in memory. Ours: ``ComposedModel``
  (the farm's wrapper) ``want`` + ``ensure`` over held ``Adapter`` objects (plan +
  ``lora_core.switch``: modules both touch are rewritten from their kept original, in
  cache-sized blocks of rows); PEFT: ``unfuse_lora`` + ``set_adapters`` + ``fuse_lora``.
* merge, restore to base: ours ``ComposedModel.reset`` (copy from the kept originals),
  PEFT ``unfuse_lora``.
* lowrank, new composition (first switch to Y) and warm switch (X <-> Y, both held): ours
  ``lora_mode="lowrank"``; PEFT unfused ``set_adapters`` only.
* svdq, warm switch and restore on nunchaku ``SVDQW4A4Linear`` stand-ins of real shape:
  ours ``targets/svdq.py`` against the seed loader's unpack-concatenate-repack approach.
* images (needs merge and lowrank): switch + N images at 1024x1024 (``--images``, default
  1 4 16; ``--steps`` per image) for ours merge / lowrank / auto and PEFT fused / unfused,
  from the switch rows above and the blocks' per-step cost measured here, base and with
  each composition's branches (``benchmarks/compose_images.py``); the crossover N where
  merging beats the branch, and ``workers.automode``'s choice at each N against it.

Floors, in the same run, with buffers allocated once: merge = max(copy of the touched
weights, B@A products in fp32 at the composition's total rank); the bf16 product time is
reported too (extrapolated from 128-row slices). Low-rank and svdq switch = copying the
LoRA tensors' bytes. Every scenario is checked once (our merged weights against PEFT's,
one module against fp64; low-rank outputs against fp64; svdq bit-identical to the seed
approach; restore bit-exact). Prints one JSON object; replaces the
"## Compose (LoRA switch cost)" section of ``benchmarks/RESULTS.md`` and writes
``benchmarks/compose_cpu.png`` (``--no-write`` to skip).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

import lora_core

from . import compose_setup as S
from . import compose_images as I
from .compose_dense import Dense
from .compose_svdq import run_svdq

RANKS = (16, 64)
SIZES = (1, 3)
MODES = ("merge", "lowrank", "svdq", "images")
FILES_PER_RANK = 6  # X uses 0..n-1, Y uses 3..3+n-1


def targets(row: dict) -> dict:
    peer_ok = row["ours_s"] <= row["peer_s"] / 3
    floor_ok = row["floor_s"] is None or row["ours_s"] <= 3 * row["floor_s"]
    return {
        "ours_over_peer": row["ours_s"] / row["peer_s"],
        "ours_over_floor": row["ours_s"] / row["floor_s"] if row["floor_s"] else None,
        "le_third_of_peer": peer_ok,
        "le_3x_floor": floor_ok if row["floor_s"] is not None else None,
        "target_met": peer_ok and floor_ok,
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    ours = S.build_model(args.blocks)
    shapes = S.target_shapes(ours)
    names = sorted(shapes)
    dense_on = bool({"merge", "lowrank"} & set(args.modes))  # the dense model's cells (and its peer)
    peer = copy.deepcopy(ours) if dense_on else None
    dense = Dense(ours, peer, names, args.blocks, args.repeats, args.merge_repeats) if dense_on else None
    rows: list[dict] = []
    adapters_by_rank = {}
    phases: dict[str, float] = {"build": time.perf_counter() - t_start}
    images_on = "images" in args.modes
    costs: dict = {}

    def phase(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return out

    if images_on:  # the base step, before any branch is hooked
        steps = phase("images: base step", I.Steps, ours, args.step_divisors, args.text_tokens)
        base_step = phase("images: base step", steps.base, args.repeats)
    with tempfile.TemporaryDirectory(prefix="lora-farm-compose-") as tmp:
        for rank in args.ranks:
            paths = phase("write files", S.write_loras, shapes, rank, FILES_PER_RANK, tmp)
            ads = phase("load adapters (ours)", lambda: [lora_core.load_adapter(p) for p in paths])
            adapters_by_rank[rank] = ads
            pnames = [f"r{rank}_{i}" for i in range(FILES_PER_RANK)]
            for p, nm in zip(paths, pnames if dense_on else ()):
                phase("load adapters (peer)", S.peer_load, peer, p, nm)
            for n in args.sizes:
                X = [(ads[i], S.STRENGTHS_X[i]) for i in range(n)]
                Y = [(ads[3 + i], S.STRENGTHS_Y[i]) for i in range(n)]
                px, py = pnames[:n], pnames[3 : 3 + n]
                if "merge" in args.modes:
                    rows += phase("merge cycle", dense.merge_cycle, paths[:n], X, Y, py, rank,
                                  profile=args.profile and profiled(args, rank, n))
                if "lowrank" in args.modes:
                    rows += phase("lowrank", dense.lowrank, X, Y, px, py, rank)
                if images_on:
                    costs[f"r{rank}x{n}"] = phase("images: branch per step", I.branch_cost, steps, ours, peer, shapes, Y,
                                                  py, args.repeats, (rank, n) == (max(args.ranks), max(args.sizes)),
                                                  args.branch_divisors)
            if dense_on:
                phase("peer unload", dense.peer_clean)
    del dense, ours, peer
    if "svdq" in args.modes and not args.no_svdq:
        rows += phase("svdq", run_svdq, args.blocks, adapters_by_rank, args.sizes, args.repeats)
        if args.steady_allocator and S.steady_allocator():  # last: it is not undone
            by_key = {key(r): r for r in rows}
            for r in phase("svdq, steady allocator", run_svdq, args.blocks, adapters_by_rank, args.sizes, args.repeats):
                by_key[key(r)]["steady_allocator"] = {k: r[k] for k in ("ours_s", "peer_s", "ours_samples", "peer_samples")}
    for r in rows:
        r.update(targets(r))
        r["per_block"] = {k: (r[k] / args.blocks if r[k] is not None else None) for k in ("ours_s", "peer_s", "floor_s")}
    warm = [r for r in rows if r["scenario"] == "warm switch"]
    images = None
    if images_on:
        cells = I.cells({key(r): r for r in rows}, base_step, costs, args.steps, args.images, args.blocks)
        images = {"settings": {"image_tokens": I.IMAGE_TOKENS, "text_tokens": args.text_tokens, "steps": args.steps,
                               "images": list(args.images), "step_divisors": list(args.step_divisors),
                               "branch_divisors": list(args.branch_divisors),
                               "scaling_tolerance": I.SCALING_TOL, "hysteresis": I.HYSTERESIS},
                  "base_step": base_step, "cells": cells, "targets": I.summary(cells)}
    return {
        "benchmark": "compose",
        "command": "python -m benchmarks.compose " + " ".join(sys.argv[1:]),
        "machine": dict(machine(), loadavg_1m_start=round(load_before[0], 2), loadavg_1m_end=round(os.getloadavg()[0], 2)),
        "settings": {"blocks": args.blocks, "repeats": args.repeats, "merge_repeats": args.merge_repeats, "threads": args.threads, "ranks": list(args.ranks),
                     "sizes": list(args.sizes), "dtype": "bfloat16", "model": S.qwen_config(args.blocks)},
        "scenarios": {key(r): r for r in rows},
        "targets": {
            "warm_switch_le_third_of_peer_all": all(r["le_third_of_peer"] for r in warm),
            "warm_switch_le_3x_floor_all": all(r["le_3x_floor"] for r in warm),
            "all_checks_ok": all(r["check"]["ok"] for r in rows) and (images is None or images["targets"]["branch_checks_ok"]),
            **({f"images_{k}": v for k, v in images["targets"].items()} if images else {}),
        },
        "images": images,
        "profile_warm_merge": {f"r{r['rank']}x{r['loras']}": r.pop("profile") for r in rows if "profile" in r},
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "total_s": time.perf_counter() - t_start,
    }


def profiled(args: argparse.Namespace, rank: int, n: int) -> bool:
    """The merge cells whose warm switch is profiled: the smallest (fixed costs show most
    beside its floor) and the largest rank x composition."""
    return (rank, n) in {(min(args.ranks), min(args.sizes)), (max(args.ranks), max(args.sizes))}


def key(r: dict) -> str:
    return f"{r['mode']}/{r['scenario'].replace(' ', '_')}/r{r['rank']}x{r['loras']}"


def machine() -> dict:
    import platform

    import diffusers
    import peft

    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "kernel": platform.release(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: a short table)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="samples per cell (median reported)")
    ap.add_argument("--merge-repeats", type=int, default=None,
                    help="samples per dense-merge cell (cold, warm, restore): each is seconds of work "
                         "per block for ours and for PEFT (mostly PEFT's); default --repeats (~10 min in all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=(1, 2, 3))
    ap.add_argument("--no-svdq", action="store_true", help="the same as leaving svdq out of --modes")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="which cells to run (default all); the others are skipped, to measure a few in less time")
    ap.add_argument("--images", type=int, nargs="+", default=list(I.IMAGES), help="N of the switch + N images cells")
    ap.add_argument("--steps", type=int, default=I.STEPS, help="denoising steps per image (one transformer forward each)")
    ap.add_argument("--text-tokens", type=int, default=I.TEXT_TOKENS, help="prompt tokens of the image step")
    ap.add_argument("--step-divisors", type=int, nargs=2, default=list(I.DIVISORS),
                    help="the per-step costs are timed at 1/d of the tokens for these two d and scaled")
    ap.add_argument("--branch-divisors", type=int, nargs=2, default=list(I.BRANCH_DIVISORS),
                    help="the branches' per-step cost is timed at 1/d of the tokens for these two d and scaled")
    ap.add_argument("--no-steady-allocator", dest="steady_allocator", action="store_false",
                    help="skip measuring the svdq rows a second time with glibc malloc's thresholds fixed")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / the PNG")
    args = ap.parse_args(argv)
    if args.merge_repeats is None:
        args.merge_repeats = args.repeats
    if "images" in args.modes and not {"merge", "lowrank"} <= set(args.modes):
        ap.error("--modes images needs merge and lowrank too (its switch seconds are their rows)")
    for flag, ds in (("--step-divisors", args.step_divisors), ("--branch-divisors", args.branch_divisors)):
        bad = [d for d in ds if d < 1 or I.IMAGE_TOKENS % d or args.text_tokens % d]
        if bad:
            ap.error(f"{flag} {bad}: each must divide the {I.IMAGE_TOKENS} image tokens and --text-tokens "
                     f"{args.text_tokens}")
    result = run(args)
    if not args.no_write:
        from .compose_report import write_plot, write_results

        write_results(result)
        write_plot(result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        from .compose_report import table

        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
