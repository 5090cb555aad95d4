"""Hostile manifests fail fast as manifest problems (exit 2, the path named), in bounded time and
memory, measured from the process: deep nesting, text the results table cannot hold, huge values."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs.limits import MAX_NESTING, lone_surrogate, nesting_depth
from jobs.manifest import ManifestError, validate_manifest
from jobs.validate import describe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = {"model": {"backend": "tiny"}, "output": "out"}


def run_validate(path) -> tuple[int, str, float, int]:
    """``farm validate PATH`` in a fresh process: exit code, output, seconds and peak RSS in MB.

    The peak is the process's own (``VmHWM``, which starts anew at exec), not ``ru_maxrss``,
    which on Linux keeps the forking parent's size: pytest's, with torch loaded."""
    code = ("import sys, time; from farm.cli import main; t = time.perf_counter(); rc = main(['validate', "
            f"{str(path)!r}]); hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')); "
            "print('@@', time.perf_counter() - t, int(hwm.split()[1]) // 1024); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out, _, measured = (p.stdout + p.stderr).partition("@@")  # the CLI prints its problems to stdout
    seconds, mb = measured.split()[:2]
    return p.returncode, out + p.stderr, float(seconds), int(mb)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("name, text", [
    ("deep.json", json.dumps({**BASE, "jobs": [{"prompt": "a", "seed": 1}]})[:-1] + ', "x": ' + deep(200_000) + "}"),
    ("deep.yaml", "model: {backend: tiny}\njobs:\n  - prompt: a\n    seed: 1\n    loras: " + deep(200_000) + "\n"),
])
def test_a_manifest_nested_beyond_any_parser_is_a_manifest_problem(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    rc, out, seconds, mb = run_validate(path)
    assert rc == 2, out
    assert f"{path}: nested too deeply to parse" in out and "Traceback" not in out
    assert seconds < 10 and mb < 400, (seconds, mb)


def test_nesting_past_the_limit_that_parses_is_refused_before_validation(tmp_path):
    data = {**BASE, "jobs": [{"prompt": "a", "seed": 1, "loras": json.loads(deep(MAX_NESTING + 5))}]}
    with pytest.raises(ManifestError) as e:
        validate_manifest(data)
    assert e.value.problems == [f"manifest: nested more than {MAX_NESTING} levels deep (jobs.limits.MAX_NESTING)"]
    ok = {**BASE, "model": {"backend": "tiny", "args": {"a": {"b": {"c": [1, [2]]}}}}, "jobs": [{"prompt": "a", "seed": 1}]}
    assert len(validate_manifest(ok).jobs) == 1  # a real manifest's few levels are fine


def test_nesting_depth_counts_without_recursion_and_stops_past_the_limit():
    assert nesting_depth(1) == 0 and nesting_depth([]) == 1 and nesting_depth({"a": [1, {"b": ()}]}) == 4
    very: list = []
    for _ in range(50_000):  # deeper than Python's recursion limit
        very = [very]
    assert nesting_depth(very, limit=10) == 11


def test_a_lone_surrogate_is_refused_with_its_field_path(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**BASE, "jobs": [{"prompt": "ok", "seed": 1},
                                                 {"prompt": "a \ud800 b", "seed": 2, "negative_prompt": "\udfff"}]}))
    rc, out, _, _ = run_validate(path)
    assert rc == 2, out
    assert "jobs[1].prompt: not valid Unicode text: a lone UTF-16 surrogate at character 2" in out
    assert "jobs[1].negative_prompt: not valid Unicode text" in out and "jobs[0]" not in out
    assert lone_surrogate("a \ud83d\ude00 pair joined by the JSON parser is fine".encode(
        "utf-16", "surrogatepass").decode("utf-16")) is None
    assert lone_surrogate("x\ud800") == 1 and lone_surrogate("plain") is None


def test_a_huge_offending_value_is_echoed_short_and_cheaply():
    huge = ["x" * 1000] * 100_000 + [{"k": "v" * 10**6}]
    text = describe(huge)
    assert len(text) < 120 and text.startswith("(got list [")
    with pytest.raises(ManifestError) as e:
        validate_manifest({**BASE, "jobs": [{"prompt": "a", "seed": "v" * 10**6}]})
    assert max(len(p) for p in e.value.problems) < 200
