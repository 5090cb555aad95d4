"""nunchaku's packed low-rank layout: ``lora_core.nunchaku``'s pack with its precomputed pair
index against the same module's two-step path (tiles into storage order, then a gather inside
each tile), on Qwen-Image's SVDQ factor shapes, appended to a rank-32 base as a first switch
does; bf16, one thread. Each cell: median microseconds, both bit-identical, and the floor
(copying the packed result's bytes between buffers allocated once).

    python -m benchmarks.pack [--json] [--repeats N] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import torch

from lora_core import nunchaku as N

from .common import machine, write_section
from .compose_setup import med, repeat

#: (packed rows P, what they are): Qwen-Image's SVDQ inputs and outputs (down: P = in; up: P = out)
SHAPES = ((3072, "in of every layer; out of to_out"), (9216, "out of the fused to_qkv"), (12288, "MLP hidden"))
#: the LoRA part's rank: one rank-16 LoRA; r16 on q, k and v of to_qkv; r64 x 3 on q, k, v
RANKS = (16, 48, 192, 576)
BASE_RANK = 32


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median microseconds of ``repeats`` timings (the compose benchmark's timer), after one untimed call."""
    fn()
    return med(repeat(fn, repeats)) * 1e6


def two_step(w: torch.Tensor, down: bool, after: torch.Tensor) -> torch.Tensor:
    """The same pack with the index switched off (``INDEX_BYTES = 0``): the two-step path."""
    kept = N.INDEX_BYTES
    N.INDEX_BYTES = 0
    try:
        return N.pack_lowrank(w, down, after=after)
    finally:
        N.INDEX_BYTES = kept


def run(shapes: Sequence[int], ranks: Sequence[int], repeats: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for p in shapes:
        for r in ranks:
            base = torch.randn(p, BASE_RANK, generator=g).to(dtype)
            for down in (True, False):
                w = (torch.randn(r, p, generator=g) if down else torch.randn(p, r, generator=g)).to(dtype)
                ours = N.pack_lowrank(w, down, after=base)
                peer = two_step(w, down, after=base)
                src, dst = torch.empty_like(ours).copy_(ours), torch.empty_like(ours)
                rows.append({
                    "P": p, "rank": r, "factor": "down" if down else "up",
                    "index_us": _median_us(lambda: N.pack_lowrank(w, down, after=base), repeats),
                    "two_step_us": _median_us(lambda: two_step(w, down, after=base), repeats),
                    "copy_us": _median_us(lambda: dst.copy_(src), repeats),
                    "bytes": ours.numel() * ours.element_size(),
                    "same": bool(torch.equal(ours.view(torch.int16), peer.view(torch.int16))),
                })
    return rows


def table(rows: list[dict]) -> str:
    out = ["| P | LoRA rank | factor | index us | two-step us | two-step / index | copy floor us | index / floor "
           "| bit-identical |", "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for x in rows:
        out.append(f"| {x['P']} | {x['rank']} | {x['factor']} | {x['index_us']:.0f} | {x['two_step_us']:.0f} "
                   f"| {x['two_step_us'] / x['index_us']:.2f}x | {x['copy_us']:.0f} | {x['index_us'] / x['copy_us']:.1f}x "
                   f"| {'yes' if x['same'] else '**no**'} |")
    return "\n".join(out)


def section(rows: list[dict], repeats: int) -> str:
    speed = [x["two_step_us"] / x["index_us"] for x in rows]
    return "\n".join([
        "## Packing (nunchaku low-rank layout)", "",
        f"`python -m benchmarks.pack` ({machine(['torch'])}; 1 thread, bf16, median of {repeats}). A LoRA factor "
        f"of the given rank packed and appended to a packed rank-{BASE_RANK} base, as a first SVDQ switch does "
        "(`lora_core.nunchaku.pack_lowrank(w, down, after=base)`): the pair index precomputed per shape "
        "(one `index_select`, then one `cat` per 16-row block) against the same function with the index switched "
        "off (tiles into storage order, then a gather inside each tile, then the same `cat`). Floor: copying the "
        "result's bytes between buffers allocated once.", "",
        table(rows), "",
        f"The index path is {min(speed):.2f}-{max(speed):.2f}x faster; every cell bit-identical: "
        f"{'yes' if all(x['same'] for x in rows) else '**NO**'}.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run([p for p, _ in SHAPES], RANKS, args.repeats)
    if not args.no_write:
        write_section(section(rows, args.repeats))
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0 if all(x["same"] for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
