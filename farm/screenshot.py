"""A PNG of an HTML page (the report) from Debian's headless Chromium.

``python -m farm.screenshot REPORT.html OUT.png [--width W] [--height H]``. Chromium runs
with its own throwaway profile (removed afterwards) and a time limit; on timeout its whole
process group is stopped, so no renderer outlives the call.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

BINARIES = ("chromium", "chromium-browser")
TIMEOUT_S = 60.0


def find_chromium(chromium: str | None = None) -> str:
    """The Chromium binary to run: ``chromium`` (a path or a name on PATH) or the first of ``BINARIES``."""
    names = (chromium,) if chromium else BINARIES
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(f"headless Chromium not found: no {' or '.join(repr(n) for n in names)} on PATH "
                       "(install Debian's chromium package: `make browser`)")


def screenshot(html_path: str, png_path: str, width: int = 1200, height: int = 900, chromium: str | None = None,
               timeout_s: float = TIMEOUT_S) -> str:
    """Render ``html_path`` at ``width`` x ``height`` CSS pixels into ``png_path``; returns ``png_path``.

    RuntimeError when Chromium is missing, fails, times out, or writes no image.
    """
    binary = find_chromium(chromium)
    if not os.path.isfile(html_path):
        raise FileNotFoundError(f"no page to screenshot at {html_path}")
    url = pathlib.Path(html_path).resolve().as_uri()
    out = os.path.abspath(png_path)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if os.path.exists(out):
        os.remove(out)  # so a stale file is never taken for this run's image
    profile = tempfile.mkdtemp(prefix="rf-shot-")
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--screenshot={out}", f"--window-size={int(width)},{int(height)}", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        _stop(proc)
        raise RuntimeError(f"{binary} took over {timeout_s:.0f}s to screenshot {html_path}") from e
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)
    if proc.returncode != 0 or not os.path.exists(out) or os.path.getsize(out) == 0:
        tail = log.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{binary} wrote no screenshot of {html_path} (exit {proc.returncode}): {tail}")
    return png_path


def _stop(proc: subprocess.Popen) -> None:
    """End Chromium's process group (its renderers and zygotes live on after the browser otherwise)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("html", help="the page, e.g. demo-out/report.html")
    parser.add_argument("png", help="where to write the PNG")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.html, args.png, args.width, args.height, args.chromium))
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
