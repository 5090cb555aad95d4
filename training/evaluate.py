"""What the trained tiny model draws, measured: ``python -m training.evaluate``.

Renders the same 24 prompts of the dataset (8 steps, 128x128, the demo's settings) with the
trained weights and with random ones, reads each picture back (background colour, shape
colour, shape kind: ``testsupport.image_measures.read_picture``) and scores the share that
matches the prompt; then renders them with each demo LoRA at strengths 0.5, 0.75 and 1 (merged
by ``lora_core.apply``) and reports each effect's image-space measure. Writes its section of
``benchmarks/RESULTS.md``. The tests (tests/workers/test_tiny_trained.py,
tests/farm/test_demo_loras.py) assert bounds on the same quantities.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORAS = os.path.join(ROOT, "examples", "loras")
TITLE = "The tiny trained model: what it draws"
STRENGTHS = (0.5, 0.75, 1.0)


def cases(n: int = 24, seed: int = 7) -> list[tuple[str, str, str]]:
    """``n`` (shape, shape colour, background colour) of the dataset's 168, drawn once."""
    from .shapes import COLOURS, SHAPES

    return random.Random(seed).sample([(s, f, b) for s in SHAPES for f in COLOURS for b in COLOURS if f != b], n)


def render(model, prompts: list[str], steps: int = 8) -> list:
    from workers.backends.base import RenderRequest

    return model.render([RenderRequest(p, seed=i, steps=steps, width=128, height=128) for i, p in enumerate(prompts)])


def reading_scores(images, which: list[tuple[str, str, str]]) -> dict[str, float]:
    from testsupport.image_measures import read_picture

    read = [read_picture(im) for im in images]
    return {part: sum(r[i] == c[i] for r, c in zip(read, which)) / len(which)
            for i, part in enumerate(("shape", "shape colour", "background"))}


def evaluate(n: int = 24) -> dict:
    import numpy as np
    import torch

    import lora_core
    from testsupport.image_measures import MEASURES
    from workers.backends.registry import make_backend

    from .shapes import prompt_of

    which = cases(n)
    prompts = [prompt_of(*c) for c in which]
    t0 = time.perf_counter()
    out: dict = {"cases": n, "readings": {}, "measures": {}}
    for label, spec in (("trained", {"backend": "tiny"}), ("random", {"backend": "tiny", "weights": "random"})):
        out["readings"][label] = reading_scores(render(make_backend(spec, device="cpu"), prompts), which)
    model = make_backend({"backend": "tiny"}, device="cpu")

    def measured(images) -> dict[str, float]:
        return {m: float(np.mean([f(np.asarray(im.convert("RGB")), p) for im, p in zip(images, prompts)]))
                for m, f in MEASURES.items()}

    out["measures"]["base"] = measured(render(model, prompts))
    for name in MEASURES:
        for s in STRENGTHS:
            handle = lora_core.apply(model.transformer, [(os.path.join(LORAS, f"{name}.safetensors"), s)])
            try:
                out["measures"][f"{name} {s}"] = measured(render(model, prompts))
            finally:
                handle.restore()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["threads"] = torch.get_num_threads()
    return out


def section(doc: dict, command: str, machine: str) -> str:
    r = doc["readings"]
    parts = list(r["trained"])
    read_rows = "\n".join(f"| {label} | " + " | ".join(f"{r[label][p]:.2f}" for p in parts) + " |" for label in r)
    names = list(doc["measures"]["base"])
    measure_rows = "\n".join(f"| {label} | " + " | ".join(f"{v[m]:.3f}" for m in names) + " |"
                             for label, v in doc["measures"].items())
    return (f"`{command}` ({doc['cases']} prompts of the dataset, one seed each, 8 steps at 128x128, "
            f"{doc['threads']} torch threads, {doc['seconds']:.0f} s on {machine}).\n\n"
            "Share of the pictures whose reading (`testsupport.image_measures.read_picture`: the border's "
            "colour, the colour of the pixels far from it, and the shape whose outline of the same area at "
            "their centroid overlaps them best; it reads every exactly drawn picture right) matches the "
            "prompt (chance: 1/3 for the shape, 1/8 for a colour):\n\n"
            "| weights | " + " | ".join(parts) + " |\n|---|" + "---|" * len(parts) + "\n" + read_rows + "\n\n"
            "Each demo LoRA's measure (mean over the same pictures; `palette`: -1 the prompt's colours, +1 "
            "their opposites; `stripes`: share of the luminance power at the stripes' frequency and angle; "
            "`snowman`: foreground inside minus outside the snowman's outline), merged at each strength:\n\n"
            "| composition | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n" + measure_rows + "\n")


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print, leave benchmarks/RESULTS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = evaluate()
    import json

    print(json.dumps(doc, indent=1))
    if not args.no_write:
        from benchmarks.common import machine, replace_section

        replace_section(TITLE, section(doc, f"python -m training.evaluate --threads {args.threads}",
                                       machine(("torch", "diffusers"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
