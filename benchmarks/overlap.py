"""Benchmark: does a worker keep its device busy while its PNGs are encoded and written?

    python -m benchmarks.overlap [--render-s 1.0] [--images 8] [--size 1328] [--chunk 2] [--json] [--write-results]

One ``RenderWorker`` (no Ray) on the sleep backend (``testsupport.sleep``): a render costs
R seconds per image and returns a realistic ``size``-pixel image (a gradient plus noise,
so PNG encoding costs what a real render's does), one image per batch (``max_batch`` 1).
It is driven the way the dispatcher drives a worker: two calls in flight at once (two
threads, as the threaded actor runs them, ``workers.actor.CONCURRENT_CALLS``), each taking
the next chunk of jobs and calling ``render`` on it until none are left. Measured twice in
one run, on fresh workers: ``overlap_output=False`` (encode + write inside the model lock:
the device waits) and ``True`` (they run on the worker's writer threads). Reported: images
per second of each, the target 0.9 x 1/R, and the mean seconds of one PNG's encode, stamp
and write. Images go to a temporary directory, removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

from benchmarks.common import machine, write_section

TITLE = "## Worker output overlap"
TARGET_SHARE = 0.9  # of 1/R: the device idles at most a tenth of the time


def _timed_worker_class():
    """RenderWorker timing each PNG's encode + stamp + write (its ``_write``), in any thread."""
    from workers.worker import RenderWorker

    class TimedWorker(RenderWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.write_s: list[float] = []
            self._times_lock = threading.Lock()

        def _write(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._write(*args, **kwargs)
            finally:
                with self._times_lock:
                    self.write_s.append(time.perf_counter() - t0)

    return TimedWorker


def drive(worker, jobs: list, chunk: int, out_dir: str, calls: int = 2) -> tuple[float, list]:
    """``calls`` threads each rendering the next ``chunk`` of ``jobs`` until none are left;
    the wall seconds from the first call to the last row, and every row."""
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    lock = threading.Lock()
    rows: list = []

    def loop():
        while True:
            with lock:
                if not chunks:
                    return
                mine = chunks.pop(0)
            got = worker.render(mine, out_dir)
            with lock:
                rows.extend(got)

    threads = [threading.Thread(target=loop, name=f"call-{i}") for i in range(calls)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, rows


def measure(overlap: bool, render_s: float, images: int, size: int, chunk: int, tmp: str) -> dict:
    import testsupport.sleep  # noqa: F401 - registers the "sleep" backend in this process
    from jobs.manifest import Job
    from jobs.options import FarmOptions

    name = "overlapped" if overlap else "serial"
    spec = {"backend": "sleep", "render_s": render_s, "image_size": size, "realistic": True}
    worker = _timed_worker_class()(spec, f"bench-{name}", options=FarmOptions(max_batch=1, lora_mode="merge"),
                                   cache_dir=os.path.join(tmp, "cache"), overlap_output=overlap)
    worker.model  # built before the clock starts: a load is not what is measured here
    jobs = [Job(f"{name}-{i}", "a lighthouse at dusk", i, (), 4, size, size, 1.0) for i in range(images)]
    wall, rows = drive(worker, jobs, chunk, os.path.join(tmp, name))
    bad = [r for r in rows if r.status != "ok"]
    if len(rows) != images or bad:
        raise RuntimeError(f"{name}: {len(rows)} rows for {images} jobs, failures: {[r.error for r in bad][:3]}")
    return {"overlap_output": overlap, "wall_s": wall, "images_per_s": images / wall,
            "write_s_mean": sum(worker.write_s) / len(worker.write_s), "writes": len(worker.write_s),
            "render_s_measured": worker.state()["render_s"]}


def run(render_s: float = 1.0, images: int = 8, size: int = 1328, chunk: int = 2) -> dict:
    if render_s <= 0 or images < 1 or size < 1 or chunk < 1:
        raise ValueError("render_s must be > 0; images, size and chunk >= 1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as tmp:
        modes = {"serial": measure(False, render_s, images, size, chunk, tmp),
                 "overlapped": measure(True, render_s, images, size, chunk, tmp)}
    target = TARGET_SHARE / render_s
    return {"benchmark": "overlap", "machine": machine(("torch", "pillow")), "render_s": render_s, "images": images,
            "size": size, "chunk": chunk, "calls_in_flight": 2, "target_images_per_s": target,
            "serial": modes["serial"], "overlapped": modes["overlapped"],
            "speedup": modes["overlapped"]["images_per_s"] / modes["serial"]["images_per_s"],
            "target_met": modes["overlapped"]["images_per_s"] >= target, "total_s": time.perf_counter() - t0}


def markdown(r: dict, command: str) -> str:
    ideal = 1 / r["render_s"]
    lines = [
        TITLE, "",
        f"Command: `{command}` ({r['total_s']:.0f} s)  ",
        f"Machine: {r['machine']}", "",
        f"One RenderWorker (no Ray), sleep backend: R = {r['render_s']:g} s per image, realistic "
        f"{r['size']}x{r['size']} images (gradient + noise), max_batch 1; {r['images']} images in chunks of "
        f"{r['chunk']}, {r['calls_in_flight']} render() calls in flight (as the threaded actor runs them). "
        f"Device-bound ideal 1/R = {ideal:.3f} images/s; target {TARGET_SHARE:g} x 1/R = "
        f"{r['target_images_per_s']:.3f} images/s.", "",
        "| mode | images/s | share of 1/R | wall s | PNG encode + stamp + write, s/image (mean) |",
        "|---|---|---|---|---|",
    ]
    for name, flag in (("serial", "overlap_output=False"), ("overlapped", "overlap_output=True")):
        m = r[name]
        lines.append(f"| {name} (`{flag}`) | {m['images_per_s']:.3f} | {m['images_per_s'] / ideal:.0%} | "
                     f"{m['wall_s']:.2f} | {m['write_s_mean']:.3f} |")
    lines += ["", f"Overlapped / serial: {r['speedup']:.2f}x. Target {'met' if r['target_met'] else 'NOT met'} "
                  f"({r['overlapped']['images_per_s']:.3f} vs {r['target_images_per_s']:.3f} images/s).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--render-s", type=float, default=1.0, help="seconds per image of the sleep backend (R)")
    ap.add_argument("--images", type=int, default=8, help="images per mode")
    ap.add_argument("--size", type=int, default=1328, help="image side in pixels")
    ap.add_argument("--chunk", type=int, default=2, help="jobs per render() call")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--write-results", action="store_true", help=f"replace the {TITLE!r} section of RESULTS.md")
    args = ap.parse_args(argv)
    r = run(args.render_s, args.images, args.size, args.chunk)
    command = ("python -m benchmarks.overlap " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.write_results:
        write_section(markdown(r, command))
    print(json.dumps(r, indent=1) if args.json else markdown(r, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
