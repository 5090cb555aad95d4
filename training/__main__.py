"""`python -m training`: train the tiny model and its demo LoRAs from a seed.

Writes ``workers/backends/tiny_trained/`` (the weights the tiny backend loads by default) and
``examples/loras/`` (the demo's LoRAs); ``--quick`` trains a few steps of each stage (a check
of the script, not a model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    import torch

    from .run import QUICK, Sizes, train_all, train_loras_only

    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=None, help="where the weights go (default: the committed ones, "
                    "workers/backends/tiny_trained/)")
    ap.add_argument("--loras", default=None, help="where the LoRAs go (default: the committed ones, examples/loras/)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 made the committed files; the "
                    "bytes depend on the count, the loss curve a little)")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage")
    ap.add_argument("--loras-only", action="store_true",
                    help="train the demo LoRAs again on the weights in --weights (the same LoRAs a whole run makes)")
    ap.add_argument("--no-write", action="store_true", help="leave benchmarks/RESULTS.md and its plot alone")
    args = ap.parse_args(argv)
    if args.quick and (args.weights is None or args.loras is None):
        ap.error("--quick trains a throwaway model: give --weights DIR and --loras DIR (not the committed files)")
    args.weights = args.weights or os.path.join(ROOT, "workers", "backends", "tiny_trained")
    args.loras = args.loras or os.path.join(ROOT, "examples", "loras")
    torch.set_num_threads(args.threads)
    train = train_loras_only if args.loras_only else train_all
    doc = train(args.weights, args.loras, args.seed, QUICK if args.quick else Sizes(),
                log=lambda line: print(line, flush=True))
    if not (args.quick or args.no_write):
        from .report import write_results

        write_results(doc, "python -m training" + (f" --seed {args.seed}" if args.seed else "")
                      + (" --loras-only" if args.loras_only else "") + f" --threads {args.threads}")
    print(json.dumps({k: doc[k] for k in ("seed", "seconds", "threads")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
