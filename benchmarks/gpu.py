"""The compose benchmark on a GPU at Qwen-Image's full size, plus one render step; on a CPU, a smoke run of the same code.

    python -m benchmarks.gpu [--out PREFIX] [--preset full|smoke] [--budget-s 300] [--phases render dense svdq]
    bash benchmarks/gpu.sh [the same options]

With CUDA (preset ``full``): diffusers ``QwenImageTransformer2DModel`` at Qwen-Image's own
config (60 blocks, 3072 wide), bf16, random weights allocated straight on the device.
Three phases, each with its own model, timed with CUDA events (``compose_setup.use_timer``):

* render: one denoising step (a forward of the whole transformer at 1024x1024, i.e. 4096
  image tokens, plus 256 text tokens) with the base, with our low-rank branches active
  (``ComposedModel(lora_mode="lowrank")``) and with PEFT's unfused adapters active, per rank
  at the largest composition; checks: the base output is bit-identical after our restore,
  and ours and PEFT's add the same LoRA term.
* dense: ``compose_dense.Dense``'s cells (merge cold / warm switch / restore against PEFT and
  the floor; low-rank first and warm switch against PEFT's ``set_adapters`` and the copy
  floor) with their exactness checks, on as many blocks as ours, the peer and the merge's
  kept originals fit in device memory (at most ``--blocks``; the JSON says how many and why).
* svdq: ``compose_svdq``'s cells (first and warm switch against the copy floor and the seed
  loader's repack) on SVDQ stand-ins of real shape on the device, same block count.

LoRA adapters are held on the device (moved once, untimed), as PEFT's are (merge cold loads
the files). A time budget
(``--budget-s``, default 300 s from start, so a first run leaves device time to rerun) skips a cell that would not fit in what is left
(recorded under ``skipped``) and a hard stop 60 s past it writes what was measured. Without
CUDA (preset ``smoke``): 2 blocks of a 128-wide model, rank 4, 128x128, the wall-clock
timer; everything else is the same code. Writes ``PREFIX.json`` and ``PREFIX.md`` (default
``benchmarks/gpu_results``; ``benchmarks/gpu_smoke`` for the smoke preset).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from types import MappingProxyType

import torch

import lora_core
from lora_core.adapter import Adapter
from testsupport import lora as T
from workers.wrapper import ComposedModel

from . import compose_setup as S
from . import gpu_render as R
from .compose import FILES_PER_RANK, key, targets
from .compose_dense import Dense
from .compose_svdq import Backend, SeedLoader, _one, build_tree, without_modulation
from .gpu_budget import HARD_STOP_GRACE_S, Budget, Watchdog, timer_for

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = {"num_attention_heads": 4, "attention_head_dim": 32, "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12)}
PRESETS = {
    "full": dict(blocks=60, ranks=[16, 64], sizes=[1, 3], repeats=3, merge_repeats=2, resolution=1024,
                 txt_tokens=256, render_repeats=3, config={}),
    "smoke": dict(blocks=2, ranks=[4, 8], sizes=[1, 2], repeats=2, merge_repeats=1, resolution=128,
                  txt_tokens=8, render_repeats=1, config=SMALL),
}
PHASES = ("render", "dense", "svdq")
NOTES = {"cuda": ["merge warm switch: compose_dense times ComposedModel.ensure with time.perf_counter, not through "
                  "the timer seam; lora_core synchronizes at each module's overflow bound, so at most the last "
                  "module's merge kernels may still be queued when that clock stops"]}


# ---- model, LoRA files, adapters ----------------------------------------------------------
def meta_model(config: dict, blocks: int):
    """The model on the meta device: its modules and shapes, no memory."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(**dict(S.qwen_config(blocks), **config))


def block_bytes(config: dict) -> tuple[int, int, dict]:
    """bf16 bytes of one block and of everything else, and one block's LoRA targets {name: (in, out)}."""
    m = meta_model(config, 1)
    blk = sum(p.numel() for n, p in m.named_parameters() if n.startswith("transformer_blocks."))
    rest = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("transformer_blocks."))
    return 2 * blk, 2 * rest, S.target_shapes(m)


def blocks_that_fit(free: int, per_block: int, fixed: int, asked: int) -> int:
    """The most blocks (1 to ``asked``) whose ``per_block`` bytes each, plus ``fixed``, fit in
    90% of ``free`` less 4 GiB of headroom (scratch, PEFT's temporaries, the allocator's slack)."""
    return max(1, min(asked, int((0.9 * free - (4 << 30) - fixed) // per_block)))


def fit_blocks(args, device: torch.device, models: int, files: int) -> tuple[int, str]:
    """``blocks_that_fit`` for ``models`` copies of the weights and ``files`` LoRAs of the largest rank."""
    if device.type != "cuda":
        return args.blocks, "as asked (no device-memory bound off CUDA)"
    blk, rest, shapes = block_bytes(args.config)
    lora = 2 * max(args.ranks) * sum(i + o for i, o in shapes.values())
    free = torch.cuda.mem_get_info(device)[0]
    fit = blocks_that_fit(free, models * blk + files * lora, models * rest, args.blocks)
    why = (f"{models} weight copies x {blk / 2**30:.2f} GiB/block + {files} LoRAs x {lora / 2**20:.0f} MiB/block "
           f"in 90% of {free / 2**30:.1f} GiB free, less 4 GiB")
    return fit, ("as asked; " if fit == args.blocks else "shrunk to fit: ") + why


def dense_files(args) -> int:
    """LoRAs on the device at most in the dense phase: ours for every rank, the peer's six
    plus a cold composition's (bounded by the largest rank)."""
    return FILES_PER_RANK * (len(args.ranks) + 1) + max(args.sizes)


def write_loras(shapes: dict, rank: int, count: int, directory: str, device: torch.device) -> list[str]:
    """``compose_setup.write_loras``' files (PEFT keys with ``.alpha`` = rank/2, bf16), the
    factors drawn on ``device``: 60 blocks' worth drawn by one CPU core would take minutes."""
    paths = []
    for i in range(count):
        g = torch.Generator(device=device).manual_seed(1000 * rank + i)

        def draw(*shape):
            return (torch.randn(*shape, generator=g, device=device) * 0.05).to(S.DTYPE).cpu()

        layers = {n: (draw(rank, n_in), draw(n_out, rank), rank / 2) for n, (n_in, n_out) in sorted(shapes.items())}
        paths.append(T.write_safetensors(os.path.join(directory, f"r{rank}_{i}.safetensors"),
                                         T.peft_state_dict(layers, prefix="transformer.")))
    return paths


def on_device(a: Adapter, device: torch.device) -> Adapter:
    """The adapter with its factors on ``device`` (the same object on the CPU)."""
    if device.type == "cpu":
        return a
    layers = {k: dataclasses.replace(l, A=l.A.to(device), B=l.B.to(device)) for k, l in a.layers.items()}
    return dataclasses.replace(a, layers=MappingProxyType(layers))


def free(device: torch.device) -> None:
    import gc

    if device.type == "cuda":  # the models' cycles (PEFT's layers) hold device memory until collected
        gc.collect()
        torch.cuda.empty_cache()


# ---- the phases ---------------------------------------------------------------------------
def phase_render(args, device, budget: Budget, out: dict, tmp: str) -> None:
    blocks, why = fit_blocks(args, device, models=1, files=2 * max(args.sizes) * len(args.ranks))
    out["render"] = {"blocks": blocks, "blocks_why": why, "rows": [], "checks": []}
    model = R.forward_ready(S.build_model(blocks, device=device, **args.config))
    shapes = S.target_shapes(model)
    inputs = R.inputs(model.config, args.resolution, args.txt_tokens, device)
    out["render"]["tokens"] = {"image": inputs["hidden_states"].shape[1], "text": args.txt_tokens}
    reserve = args.render_reserve
    base = budget.run("render base", "render", lambda: R.step(model, inputs, args.render_repeats), reserve)
    if base is None:
        return
    out["render"]["rows"].append(R.row("base", 0, 0, blocks, base))
    n = max(args.sizes)
    for rank in args.ranks:
        if not budget.fits(f"render r{rank}x{n}", "render lora", reserve):
            continue
        t0 = time.perf_counter()
        paths = write_loras(shapes, rank, n, tmp, device)
        pairs = [(on_device(lora_core.load_adapter(p), device), S.STRENGTHS_Y[i]) for i, p in enumerate(paths)]
        cm = ComposedModel(Backend(model), lora_mode="lowrank")
        cm.want(pairs)
        cm.ensure()
        ours = R.step(model, inputs, args.render_repeats)
        cm.reset()
        again = R.step(model, inputs, 0)
        names = [f"r{rank}_{i}" for i in range(n)]
        for p, nm in zip(paths, names):
            S.peer_load(model, p, nm)
        model.set_adapters(names, [s for _, s in pairs])
        peft = R.step(model, inputs, args.render_repeats)
        model.unload_lora()  # delete_adapters leaves PEFT's wrappers: the next rank's bind would miss
        for p in paths:
            os.remove(p)
        for variant, res in (("ours lowrank", ours), ("PEFT unfused", peft)):
            out["render"]["rows"].append(R.row(variant, rank, n, blocks, res, base))
        out["render"]["checks"].append(R.check(rank, n, base, again, ours, peft))
        budget.took["render lora"] = max(budget.took.get("render lora", 0.0), time.perf_counter() - t0)


def phase_dense(args, device, budget: Budget, out: dict, tmp: str, adapters_by_rank: dict) -> None:
    blocks, why = fit_blocks(args, device, models=3, files=dense_files(args))
    out["switch_blocks"], out["switch_blocks_why"] = blocks, why
    ours = S.build_model(blocks, device=device, **args.config)
    shapes = S.target_shapes(ours)
    names = sorted(shapes)
    peer = copy.deepcopy(ours)
    dense = Dense(ours, peer, names, blocks, args.repeats, args.merge_repeats)
    rows = out["rows"]
    reserve = args.svdq_reserve if "svdq" in args.phases else 0.0
    for rank in args.ranks:
        if not budget.fits(f"dense r{rank} setup", "dense setup", reserve):
            continue
        t0 = time.perf_counter()
        paths = write_loras(shapes, rank, FILES_PER_RANK, tmp, device)
        ads = adapters_by_rank[rank] = [on_device(lora_core.load_adapter(p), device) for p in paths]
        pnames = [f"r{rank}_{i}" for i in range(FILES_PER_RANK)]
        for p, nm in zip(paths, pnames):
            S.peer_load(peer, p, nm)
        budget.took["dense setup"] = time.perf_counter() - t0
        for n in args.sizes:
            X = [(ads[i], S.STRENGTHS_X[i]) for i in range(n)]
            Y = [(ads[3 + i], S.STRENGTHS_Y[i]) for i in range(n)]
            px, py = pnames[:n], pnames[3 : 3 + n]
            rows += budget.run(f"merge r{rank}x{n}", "merge", lambda: dense.merge_cycle(paths[:n], X, Y, py, rank),
                               reserve) or []
            rows += budget.run(f"lowrank r{rank}x{n}", "lowrank", lambda: dense.lowrank(X, Y, px, py, rank),
                               reserve) or []
        dense.peer_clean()
        for p in paths:
            os.remove(p)


def svdq_tree(blocks: int, dim: int, mlp: int, device: torch.device):
    """``compose_svdq.build_tree``'s stand-ins: one block built on the CPU (its construction
    draws dense reference weights, seconds per block at full width), copied to ``blocks``
    blocks on ``device``. The blocks hold equal bytes; a switch's cost does not depend on them."""
    tree = build_tree(1, dim, mlp).to(device)
    for _ in range(blocks - 1):
        tree.transformer_blocks.append(copy.deepcopy(tree.transformer_blocks[0]))
    return tree


def phase_svdq(args, device, budget: Budget, out: dict, tmp: str, adapters_by_rank: dict) -> None:
    if "switch_blocks" not in out:  # the dense phase did not run: the block count it would have had
        out["switch_blocks"], out["switch_blocks_why"] = fit_blocks(args, device, models=3, files=dense_files(args))
    blocks = out["switch_blocks"]
    dim = int(args.config.get("num_attention_heads", 24) * args.config.get("attention_head_dim", 128))
    tree = svdq_tree(blocks, dim, 4 * dim, device)
    seed_tree = copy.deepcopy(tree)
    cm, seed = ComposedModel(Backend(tree), lora_mode="merge"), SeedLoader(seed_tree)
    for rank in args.ranks:
        if rank not in adapters_by_rank:  # the dense phase did not run (or not for this rank): files of our own
            if not budget.fits(f"svdq r{rank} files", "dense setup"):
                continue
            paths = write_loras(S.target_shapes(meta_model(args.config, blocks)), rank, FILES_PER_RANK, tmp, device)
            adapters_by_rank[rank] = [on_device(lora_core.load_adapter(p), device) for p in paths]
        ads = [without_modulation(a) for a in adapters_by_rank[rank]]
        for n in args.sizes:
            X = [(ads[i], S.STRENGTHS_X[i]) for i in range(n)]
            Y = [(ads[3 + i], S.STRENGTHS_Y[i]) for i in range(n)]
            out["rows"] += budget.run(f"svdq r{rank}x{n}", "svdq",
                                      lambda: _one(cm, seed, tree, seed_tree, X, Y, rank, n, args.repeats, blocks)) or []
            cm.reset()
            seed.reset()


# ---- the run ------------------------------------------------------------------------------
def run(args, t0: float) -> dict:
    device = torch.device(args.device)
    budget = Budget(args.budget_s, t0)
    out = {"benchmark": "gpu", "command": "python -m benchmarks.gpu " + " ".join(args.argv), "preset": args.preset,
           "device": R.device_info(device), "timer": "CUDA events" if device.type == "cuda" else "wall clock",
           "settings": {k: getattr(args, k) for k in ("blocks", "ranks", "sizes", "repeats", "merge_repeats",
                                                      "resolution", "txt_tokens", "render_repeats", "budget_s",
                                                      "phases", "threads")},
           "model": dict(S.qwen_config(args.blocks), **args.config),
           "adapters": "held on the device (moved once, untimed), as PEFT's are; merge cold loads the files, "
                       "as in the compose benchmark",
           "notes": NOTES.get(device.type, []), "rows": [], "skipped": budget.skipped, "phases_s": {}}
    adapters_by_rank: dict = {}

    stop = Watchdog(budget.left() + HARD_STOP_GRACE_S,
                    f"hard stop {HARD_STOP_GRACE_S} s past the {args.budget_s:.0f} s budget")
    try:
        with S.use_timer(timer_for(device)), torch.no_grad(), tempfile.TemporaryDirectory(prefix="lora-farm-gpu-") as tmp:
            for name in args.phases:
                p0 = time.perf_counter()
                try:
                    if name == "render":
                        phase_render(args, device, budget, out, tmp)
                    elif name == "dense":
                        phase_dense(args, device, budget, out, tmp, adapters_by_rank)
                    else:
                        phase_svdq(args, device, budget, out, tmp, adapters_by_rank)
                except torch.OutOfMemoryError as e:  # the phase's state is unknown: on to the next, with a fresh model
                    budget.skipped.append({"cell": f"the rest of phase {name}", "why": f"out of memory: {e}"[:300]})
                free(device)  # the phase's models are gone with its frame
                out["phases_s"][name] = round(time.perf_counter() - p0, 2)
    except KeyboardInterrupt:
        if not stop.fired:
            raise
        out["aborted"] = stop.why
    finally:
        stop.cancel()
    return finish(out, t0)


def finish(out: dict, t0: float) -> dict:
    for r in out["rows"]:
        r.update(targets(r))
        r["per_block"] = {k: (r[k] / r["blocks"] if r[k] is not None else None) for k in ("ours_s", "peer_s", "floor_s")}
    out["scenarios"] = {key(r): r for r in out.pop("rows")}
    checks = [r["check"]["ok"] for r in out["scenarios"].values()]
    checks += [c["ok"] for c in out.get("render", {}).get("checks", [])]
    out["all_checks_ok"] = bool(checks) and all(checks)
    out["total_s"] = round(time.perf_counter() - t0, 2)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full" if cuda else "smoke")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--out", default=None, help="PREFIX: writes PREFIX.json and PREFIX.md")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds from start; cells past it are skipped")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on the CPU)")
    for name in ("blocks", "repeats", "merge_repeats", "resolution", "txt_tokens", "render_repeats"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="overrides the preset")
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, choices=(1, 2, 3))
    args = ap.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, copy.deepcopy(v))
    if args.device.startswith("cuda") and not cuda:
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    args.out = args.out or os.path.join(HERE, "gpu_results" if args.preset == "full" else "gpu_smoke")
    # time kept for the phases after this one (all of it is spent in a smoke run in seconds)
    args.render_reserve = 0.5 * args.budget_s if {"dense", "svdq"} & set(args.phases) else 0.0
    args.svdq_reserve = 0.15 * args.budget_s
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args, t0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    text = R.markdown(result)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0 if result["all_checks_ok"] and "aborted" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
