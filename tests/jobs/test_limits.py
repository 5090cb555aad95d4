"""Hostile manifests fail fast as manifest problems (exit 2, the path named), in bounded time and
memory, measured from the process: deep nesting, text the results table cannot hold, huge values,
YAML aliases that expand, compressed files that inflate, job counts and matrix totals past the
limit, Parquet columns that decode to gigabytes, messages that would echo megabytes."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.limits import (
    MAX_ALIAS_NODES, MAX_JOBS, MAX_MANIFEST_BYTES, MAX_NESTING, MAX_PROBLEM_CHARS, MAX_PROBLEMS, Problems,
    lone_surrogate, nesting_depth,
)
from jobs.manifest import ManifestError, validate_manifest
from jobs.sources import parse
from jobs.validate import describe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = {"model": {"backend": "tiny"}, "output": "out"}


def run_measured(imports: str, statement: str, timeout: float = 120, **env: str) -> tuple[int, str, float, int, int]:
    """``statement`` (which sets ``rc``) after ``imports``, in a fresh process with ``env`` added
    to its environment: exit code (``rc``), output, seconds the statement took, peak RSS in MB,
    and the peak before the statement (after the imports) in MB.

    The peak is the process's own (``VmHWM``, which starts anew at exec), not ``ru_maxrss``,
    which on Linux keeps the forking parent's size: pytest's, with torch loaded."""
    hwm = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024"
    code = (f"import sys, time; {imports}; base = {hwm}; t = time.perf_counter(); rc = 0; {statement}; "
            f"print('@@', time.perf_counter() - t, {hwm}, base); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **env})
    out, _, measured = (p.stdout + p.stderr).partition("@@")  # the CLI prints its problems to stdout
    seconds, mb, base = measured.split()[:3]
    return p.returncode, out + p.stderr, float(seconds), int(mb), int(base)


def run_validate(path, timeout: float = 120, **env: str) -> tuple[int, str, float, int]:
    """``farm validate PATH`` in a fresh process (``run_measured``): exit code, output, seconds
    and peak RSS in MB."""
    return run_measured("from farm.cli import main", f"rc = main(['validate', {str(path)!r}])", timeout, **env)[:4]


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


# ---- bounded reading: aliases, compression, totals ------------------------------------------
def laughs(levels: int = 9) -> str:
    """A "billion laughs" YAML document: a few hundred bytes that alias into 9**levels strings."""
    lines = ["model: {backend: tiny}", "x0: &x0 [" + ",".join(['"lol"'] * 9) + "]"]
    lines += [f"x{i}: &x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"jobs: [{{prompt: a, seed: 1, loras: *x{levels - 1}}}]"]) + "\n"


def test_yaml_aliases_that_expand_are_a_manifest_problem(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs())
    rc, out, seconds, mb = run_validate(path, timeout=60)  # main before: walked 9**9 nodes, never ended
    assert rc == 2, out
    assert f"{path}: YAML aliases expand past {MAX_ALIAS_NODES} nodes (jobs.limits.MAX_ALIAS_NODES)" in out
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_a_yaml_alias_inside_its_own_value_is_refused_and_sparing_aliases_are_fine(tmp_path):
    problems = Problems()
    assert parse("m.yaml", b"jobs: &j [{prompt: a, loras: *j}]", "m.yaml", problems) is None
    assert problems.items == ["m.yaml: YAML alias inside the value it names (jobs.limits.MAX_ALIAS_NODES)"]
    shared = ("model: {backend: tiny}\nstyle: &s [{uri: s3://b/style.safetensors, strength: 0.8}]\n"
              "jobs:\n" + "".join(f"  - {{prompt: p{i}, seed: {i}, loras: *s}}\n" for i in range(500)))
    data = parse("m.yaml", shared.encode(), "m.yaml", Problems())
    m = validate_manifest({k: v for k, v in data.items() if k != "style"})
    assert len(m.jobs) == 500 and all(j.loras[0].strength == 0.8 for j in m.jobs)


def bomb(path, fmt: str, inflated_mib: int) -> None:
    """A compressed file of ``inflated_mib`` MiB of spaces, made of concatenated 1 MiB members
    (each tool reads them back to back), so writing it costs one compression of 1 MiB."""
    one = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[fmt](b" " * (1 << 20))
    path.write_bytes(one * inflated_mib)


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz"])
def test_a_compressed_manifest_or_jobs_file_is_cut_off_past_the_limit(tmp_path, fmt):
    manifest = tmp_path / f"m.json.{fmt}"
    bomb(manifest, fmt, 320)  # main before: inflated all 320 MiB, then a str and a split of it
    rc, out, seconds, mb = run_validate(manifest)
    assert rc == 2, out
    assert (f"{manifest}: cannot read: TooLargeError: decompresses to more than {MAX_MANIFEST_BYTES >> 20} MiB "
            "(jobs.limits.MAX_MANIFEST_BYTES; set LORA_FARM_MAX_MANIFEST_MB for more)") in out
    assert seconds < 5 and mb < 300, (seconds, mb)
    jobs = tmp_path / f"jobs.jsonl.{fmt}"
    bomb(jobs, fmt, 320)
    (tmp_path / "m.yaml").write_text(f"jobs_file: {jobs.name}\n")
    rc, out, seconds, mb = run_validate(tmp_path / "m.yaml")
    assert rc == 2 and f"jobs_file: cannot read {jobs}: TooLargeError: decompresses to more than" in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_the_manifest_size_limit_can_be_raised(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p" * 1000, "seed": i}) + "\n" for i in range(1500)))  # 1.5 MB
    rc, out, _, _ = run_validate(path, LORA_FARM_MAX_MANIFEST_MB="1")
    assert rc == 2 and f"{path}: cannot read: TooLargeError: holds more than 1 MiB" in out, out
    rc, out, _, _ = run_validate(path, LORA_FARM_MAX_MANIFEST_MB="2")
    assert rc == 0 and "ok, 1500 job(s)" in out, out


def test_matrices_are_bounded_by_their_total_before_expansion(tmp_path):
    sweep = {"prompts": ["a"], "seeds": {"count": MAX_JOBS}}
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**BASE, "matrix": [dict(sweep, id_prefix=f"s{i}") for i in range(20)]}))
    rc, out, seconds, mb = run_validate(path)  # main before: 20 sweeps of 1,000,000 jobs each, all expanded
    assert rc == 2, out
    assert (f"matrix: the matrices expand to {20 * MAX_JOBS} jobs in all (limit {MAX_JOBS}): "
            f"matrix[0] {MAX_JOBS}, matrix[1] {MAX_JOBS},") in out
    assert seconds < 5 and mb < 300, (seconds, mb)
    with pytest.raises(ManifestError) as e:  # jobs and matrices share one limit
        validate_manifest({**BASE, "jobs": [{"prompt": "a", "seed": 1}, {"prompt": "a", "seed": 2}],
                           "matrix": {"prompts": ["b"], "seeds": {"count": MAX_JOBS - 1}}})
    assert e.value.problems == [f"matrix: expands to {MAX_JOBS - 1} jobs (limit {MAX_JOBS} per manifest, "
                                "2 taken by jobs)"]


def test_a_jobs_list_or_file_past_the_job_limit_is_refused_before_any_job_is_checked(tmp_path):
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("{}\n" * (MAX_JOBS + 1))  # main before: a million "prompt: required" problems
    rc, out, seconds, mb = run_validate(jsonl)
    assert rc == 2, out
    assert f"{jsonl}: {MAX_JOBS + 1} jobs (limit {MAX_JOBS} per manifest, jobs.limits.MAX_JOBS)" in out
    assert out.count("\n") < 5 and seconds < 5 and mb < 300, (seconds, mb)
    with pytest.raises(ManifestError) as e:  # a list in the manifest itself
        validate_manifest({**BASE, "jobs": [{}] * (MAX_JOBS + 1)})
    assert e.value.problems == [f"jobs: {MAX_JOBS + 1} jobs (limit {MAX_JOBS} per manifest, jobs.limits.MAX_JOBS)"]
    rows = tmp_path / "jobs.parquet"
    pq.write_table(pa.table({"prompt": pa.DictionaryArray.from_arrays(pa.array([0] * (MAX_JOBS + 1), pa.int32()),
                                                                      pa.array(["a"]))}), rows)
    rc, out, seconds, mb = run_validate(rows)
    assert rc == 2 and f"{rows}: {MAX_JOBS + 1} jobs (limit {MAX_JOBS} per manifest" in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_a_parquet_jobs_file_that_decodes_past_the_limit_is_refused_before_any_row_is_read(tmp_path):
    n, long = 40_000, "a long prompt " * 1000  # 14 KB, stored once, 560 MB once every row has it
    rows = tmp_path / "jobs.parquet"
    pq.write_table(pa.table({"prompt": pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array([long])),
                             "seed": pa.array(range(n))}), rows)
    assert rows.stat().st_size < 1 << 20
    rc, out, seconds, mb = run_validate(rows)
    assert rc == 2 and f"{rows}: decodes to more than {MAX_MANIFEST_BYTES >> 20} MiB" in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)
    pq.write_table(pa.table({"prompt": [long] * 3, "seed": [1, 2, 3]}), rows)  # what fits still loads
    assert run_validate(rows)[0] == 0


def test_problem_messages_and_their_number_are_bounded():
    with pytest.raises(ManifestError) as e:
        validate_manifest({**BASE, "storage_options": {"k" * 10**6: {}},
                           "jobs": [{"prompt": "a", "seed": 1, "x" * 10**6: 1}] + [{"seed": 1}] * 5000})
    problems = e.value.problems
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1] == f"... and {5000 + 2 - MAX_PROBLEMS} more problem(s)"
    assert max(len(p) for p in problems) <= MAX_PROBLEM_CHARS
    assert problems[0].startswith("storage_options.kkk") and problems[0].endswith("k: unknown fsspec protocol")
    assert problems[1].startswith("jobs[0]: unknown field 'xxx") and problems[2] == "jobs[1].prompt: required"


@pytest.mark.parametrize("name, text", [("big.json", '{"jobs": [{"prompt": "a", "seed": %s}]}' % ("9" * 5000)),
                                        ("big.yaml", "jobs: [{prompt: a, seed: %s}]" % ("9" * 5000)),
                                        ("hex.yaml", "jobs: [{prompt: a, seed: 0x%s}]" % ("f" * 5000))])
def test_an_integer_of_thousands_of_digits_is_a_manifest_problem(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    rc, out, _, _ = run_validate(path)
    assert rc == 2 and "Traceback" not in out, out  # main before: ValueError from int() or repr()
    seed = "jobs[0].seed: must be <= 9223372036854775807 (got int <an int of 20000 bits>)"  # 0x...: no repr either
    syntax = ("invalid JSON" in out or "invalid YAML" in out) and "(4300 digits)" in out
    assert syntax if name.startswith("big") else seed in out, out


def test_a_mapping_of_many_keys_is_checked_in_linear_time(tmp_path):
    path = tmp_path / "wide.json"
    keys = ", ".join(f'"k{i}": 1' for i in range(200_000))
    path.write_text('{"jobs": [{"prompt": "a"}], "model": {%s, "k7": 2}}' % keys)
    rc, out, seconds, mb = run_validate(path, timeout=60)  # main before: duplicate keys found in quadratic time
    assert rc == 2 and f"{path}: duplicate key 'k7'" in out and "model: unknown field 'k0'" in out, out
    assert f"... and {200_000 + 1 - MAX_PROBLEMS} more problem(s)" in out
    # ~1-2 s alone here; quadratic took 42 s for a quarter of these keys: a wide margin for a loaded machine
    assert seconds < 20 and mb < 300, (seconds, mb)
