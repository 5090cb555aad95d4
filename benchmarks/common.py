"""What every benchmark shares: the machine line and writing its section of RESULTS.md."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Iterable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(packages: Iterable[str] = ()) -> str:
    """CPU, cores, OS, Python and the versions of ``packages``, on one line."""
    versions = "".join(f", {p} {metadata.version(p)}" for p in packages)
    return (f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}{versions}")


#: Opens a section's hand-written notes: what a benchmark's numbers mean, kept in RESULTS.md (never in
#: code, where prose drifts from the figures) and carried over when the benchmark rewrites its section.
NOTES = "<!-- notes: written by hand, kept when the benchmark re-runs -->"


def write_section(text: str, path: str = RESULTS) -> None:
    """Replace the section ``text`` opens (its first line, ``## Title``) in RESULTS.md, or
    append it; every other section stays as it was, and so do the section's own notes (from
    its ``NOTES`` line to its end). Written atomically."""
    heading = text.splitlines()[0].strip()
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(heading))
        section = old[start:nxt if nxt >= 0 else len(old)]
        notes = section[section.find(NOTES):].strip("\n") if NOTES in section else ""
        body = text.rstrip("\n") + ("\n\n" + notes if notes and NOTES not in text else "")
        new = old[:start] + body + "\n" + ("\n" + old[nxt + 1:] if nxt >= 0 else "")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new.rstrip("\n") + "\n")
    os.replace(tmp, path)


def replace_section(title: str, body: str, path: str = RESULTS) -> None:
    write_section(f"## {title}\n\n{body.strip()}\n", path)
