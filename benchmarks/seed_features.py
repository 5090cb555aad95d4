"""The features carried from the seeds, measured on the embedded tiny model (CPU).

    python -m benchmarks.seed_features --json [--no-write]

Each figure is measured in this run, beside the same render without the feature:

* **fp8** (fuse, then quantize): one LoRA merged into the fp32 masters, then e4m3
  per-row; mean |pixel difference| against the fp32 model with the same LoRA, and the
  weight bytes the blocks' linears save.
* **step cache** (MagCache-style): ratios calibrated on the tiny model, then
  ``threshold 0.1, retention 0.2, k 2`` over 8 steps: transformer calls skipped, the
  transformer's own time and the render's, and the mean |pixel difference| against the
  uncached render (best of 3 runs each: the box is shared).
* **RoPE scaling** (``factor 2``, ``timestep_threshold 0.5``) at 384x256, off the square
  grid: mean |pixel difference| against the unscaled render and the time it adds.
* **Merge memory** (what ``memory_reserve_gb`` budgets): the peak extra resident memory
  of merging a rank-64 LoRA into one Qwen-width 3072->12288 bf16 linear, in a fresh
  process each: ``lora_core`` (row blocks through a 3 MiB scratch, plus the kept
  original) against the whole-matrix way (``W.float() + B@A`` cast back, plus the
  original), which is what the budget had to reserve before.

Replaces the "## Seed features (tiny model)" section of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch

from benchmarks.common import machine, write_section

REQ = dict(prompt="a green owl in a forest at night", seed=11, steps=8)
TITLE = "## Seed features (tiny model)"


def _pixels(img) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64)


def _diff(a, b) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


def _best(fn, repeats: int = 3):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def fp8() -> dict:
    from lora_core import load_adapter
    from testsupport import lora as T
    from workers.backends import make_backend
    from workers.backends.base import RenderRequest
    from workers.wrapper import ComposedModel

    req = [RenderRequest(**REQ)]
    full, quant = make_backend({"backend": "tiny"}, device="cpu"), make_backend({"backend": "tiny"}, device="cpu")
    layers = T.random_layers(T.linear_shapes(full.transformer, ("attn.", "img_mlp")), rank=8, seed=5, scale=0.3)
    ad = load_adapter(T.peft_state_dict(layers))
    a, b = ComposedModel(full, lora_mode="merge"), ComposedModel(quant, lora_mode="merge", fp8=True)
    for m in (a, b):
        m.want([(ad, 1.0)])
        m.ensure()
    return {"mean_abs_pixel_diff": _diff(full.render(req)[0], quant.render(req)[0]),
            "weight_bytes_saved": b.fp8_saved_bytes}


def step_cache() -> dict:
    from workers.backends import make_backend
    from workers.backends.base import RenderRequest

    req = [RenderRequest(**REQ)]
    model = make_backend({"backend": "tiny"}, device="cpu")
    inner = {"s": 0.0}
    model.transformer.register_forward_pre_hook(lambda *_: inner.__setitem__("s", inner["s"] - time.perf_counter()))
    model.transformer.register_forward_hook(lambda *_: inner.__setitem__("s", inner["s"] + time.perf_counter()))
    cal = model.set_step_cache({"calibrate": True})
    model.render(req)
    ratios = cal.calibrations[0]
    model.set_step_cache(None)

    def timed():
        inner["s"] = 0.0
        wall, img = _best(lambda: model.render(req)[0], 1)
        return wall, inner["s"], img

    runs = [timed() for _ in range(3)]
    plain = min(runs, key=lambda r: r[0])
    cache = model.set_step_cache({"mag_ratios": ratios, "threshold": 0.1, "retention_ratio": 0.2, "k": 2})
    runs = [timed() for _ in range(3)]
    cached = min(runs, key=lambda r: r[0])
    return {"steps": REQ["steps"], "calls_per_render": cache.stats["calls"] / 3,
            "skipped_per_render": cache.stats["skipped"] / 3,
            "transformer_s": [plain[1], cached[1]], "render_s": [plain[0], cached[0]],
            "mean_abs_pixel_diff": _diff(plain[2], cached[2]), "mag_ratios": ratios}


def rope() -> dict:
    from workers.backends import make_backend
    from workers.backends.base import RenderRequest

    req = [RenderRequest(**dict(REQ, width=384, height=256))]
    plain = make_backend({"backend": "tiny"}, device="cpu")
    scaled = make_backend({"backend": "tiny", "rope": {"factor": 2.0, "timestep_threshold": 0.5}}, device="cpu")
    t_plain, a = _best(lambda: plain.render(req)[0])
    t_scaled, b = _best(lambda: scaled.render(req)[0])
    return {"size": "384x256", "render_s": [t_plain, t_scaled], "mean_abs_pixel_diff": _diff(a, b)}


def _merge_peak(way: str) -> None:
    """Run in a fresh interpreter: prints the extra peak RSS (bytes) of one merge over the
    RSS after setup, as JSON."""
    torch.set_num_threads(1)
    from lora_core import ModelIndex, apply_updates
    from lora_core.compose import ModuleUpdate

    lin = torch.nn.Linear(3072, 12288, bias=False, device="meta")  # no fp32 init pass: setup stays at its size
    lin.weight = torch.nn.Parameter(torch.empty(12288, 3072, dtype=torch.bfloat16).uniform_(-0.01, 0.01),
                                    requires_grad=False)
    root = torch.nn.Module()
    root.lin = lin
    a, b = torch.randn(64, 3072) * 0.01, torch.randn(12288, 64) * 0.01
    index = ModelIndex(root)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # restart the peak (VmHWM) at the RSS now
        f.write("5")
    if way == "lora_core":
        apply_updates(index, {"lin": ModuleUpdate("lin", "linear", a, b)}, "merge")
    else:
        original = lin.weight.detach().clone()  # kept for restore, as any exact merge must
        new = torch.addmm(lin.weight.float(), b, a).to(torch.bfloat16)
        lin.weight.data.copy_(new)
        assert original.shape == new.shape
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_peak_bytes": (peak - before) * 1024, "weight_bytes": lin.weight.numel() * 2}))


def _status_kib(field: str) -> int:
    """A /proc/self/status figure in KiB. (Not ru_maxrss: Linux carries it over from the
    process that forked us, so a big parent would hide the child's own peak.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def merge_memory() -> dict:
    """Each way in a fresh interpreter whose allocator hands large blocks straight back to
    the OS (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows live tensors."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=root)
    out = {}
    for way in ("lora_core", "whole_matrix"):
        code = f"from benchmarks.seed_features import _merge_peak; _merge_peak({way!r})"
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                              check=True, timeout=300)
        out[way] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def run() -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = {"benchmark": "seed_features", "machine": machine(("torch", "diffusers")), "threads": 1,
           "fp8": fp8(), "step_cache": step_cache(), "rope": rope(), "merge_memory": merge_memory()}
    out["total_s"] = time.perf_counter() - t0
    return out


def markdown(r: dict, command: str) -> str:
    f, s, ro, mm = r["fp8"], r["step_cache"], r["rope"], r["merge_memory"]
    mb = 1 << 20
    return "\n".join([
        TITLE, "",
        f"Command: `{command}` ({r['total_s']:.0f} s)  ",
        f"Machine: {r['machine']}; torch threads: 1. Model: the embedded tiny Qwen-Image model, "
        f"\"{REQ['prompt']}\", seed {REQ['seed']}, {REQ['steps']} steps, 256x256 unless said.", "",
        "| feature | setting | measured beside the plain render |",
        "|---|---|---|",
        f"| fp8 (fuse, then quantize) | one rank-8 LoRA on attention + img_mlp, e4m3 per row | mean abs pixel "
        f"difference {f['mean_abs_pixel_diff']:.2f}/255 vs fp32 with the same LoRA; "
        f"{f['weight_bytes_saved'] / mb:.2f} MiB of block weights saved |",
        f"| step cache | threshold 0.1, retention 0.2, k 2, calibrated ratios | {s['skipped_per_render']:.0f} of "
        f"{s['calls_per_render']:.0f} transformer calls skipped per render; transformer {s['transformer_s'][0] * 1e3:.0f} -> "
        f"{s['transformer_s'][1] * 1e3:.0f} ms, render {s['render_s'][0]:.3f} -> {s['render_s'][1]:.3f} s; "
        f"mean abs pixel difference {s['mean_abs_pixel_diff']:.2f}/255 |",
        f"| RoPE scaling | factor 2 above timestep 0.5, {ro['size']} | render {ro['render_s'][0]:.3f} -> "
        f"{ro['render_s'][1]:.3f} s; mean abs pixel difference {ro['mean_abs_pixel_diff']:.2f}/255 |",
        f"| merge memory | rank 64 into a 3072->12288 bf16 linear ({mm['lora_core']['weight_bytes'] / mb:.0f} MiB) "
        f"| extra peak resident memory (VmHWM over VmRSS): lora_core {mm['lora_core']['extra_peak_bytes'] / mb:.0f} MiB (the kept original + "
        f"a 3 MiB scratch) vs whole-matrix {mm['whole_matrix']['extra_peak_bytes'] / mb:.0f} MiB |",
        "",
        "The step cache's calibrated ratios on this model: `" + ", ".join(f"{x:.3f}" for x in s["mag_ratios"]) + "`.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    r = run()
    if not args.no_write:
        write_section(markdown(r, ("python -m benchmarks.seed_features " + " ".join(argv if argv is not None else sys.argv[1:])).strip()))
    print(json.dumps(r, indent=1) if args.json else markdown(r, "python -m benchmarks.seed_features"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
