"""Hostile manifests fail fast as manifest problems (exit 2, the path named), in bounded time and
memory, measured from the process: deep nesting, text the results table cannot hold, huge values,
YAML aliases that expand, compressed files that inflate, job counts and matrix totals past the
limit, Parquet columns that decode to gigabytes, messages that would echo megabytes, raw control
characters, prompts of megabytes, YAML documents whose nodes would take minutes to build."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.service.config import FarmConfigError, load_farm_config
from jobs.limits import (
    MAX_ALIAS_NODES, MAX_JOBS, MAX_MANIFEST_BYTES, MAX_NESTING, MAX_PROBLEM_CHARS, MAX_PROBLEMS, MAX_PROMPT_CHARS,
    MAX_YAML_BYTES, MAX_YAML_NODES, Problems, lone_surrogate,
)
from jobs.manifest import validate_manifest
from jobs.sources import YAML_LOADERS, _parse_yaml, parse

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


def measured(code: str, timeout: float = 120, **env: str) -> tuple[Any, float, int]:
    """``code`` (which sets ``result``, JSON-able) in a fresh process (``run_measured``): the result,
    the seconds it took and the peak RSS in MB. ``problems_of(data)`` is defined for it: the
    problems ``validate_manifest(data)`` reports (``[]`` for none)."""
    stmt = f"exec({PRELUDE + code!r}); print('@R' + json.dumps(result))"
    rc, out, seconds, mb, _ = run_measured("import json", stmt, timeout, **env)
    assert rc == 0, out
    return json.loads(out.split("@R", 1)[1].splitlines()[0]), seconds, mb


PRELUDE = """
from jobs.manifest import ManifestError, validate_manifest
BASE = {"model": {"backend": "tiny"}, "output": "out"}
def problems_of(data):
    try:
        validate_manifest(data)
    except ManifestError as e:
        return e.problems
    return []
"""


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
    problems, seconds, mb = measured(f"""
result = problems_of({{**BASE, "jobs": [{{"prompt": "a", "seed": 1, "loras": {deep(MAX_NESTING + 5)}}}]}})""")
    assert problems == [f"manifest: nested more than {MAX_NESTING} levels deep (jobs.limits.MAX_NESTING)"]
    assert seconds < 5 and mb < 300, (seconds, mb)
    ok = {**BASE, "model": {"backend": "tiny", "args": {"a": {"b": {"c": [1, [2]]}}}}, "jobs": [{"prompt": "a", "seed": 1}]}
    assert len(validate_manifest(ok).jobs) == 1  # a real manifest's few levels are fine


def test_nesting_depth_counts_without_recursion_and_stops_past_the_limit():
    depths, seconds, mb = measured("""
from jobs.limits import nesting_depth
very = []
for _ in range(50_000):  # deeper than Python's recursion limit
    very = [very]
result = [nesting_depth(1), nesting_depth([]), nesting_depth({"a": [1, {"b": ()}]}), nesting_depth(very, limit=10)]""")
    assert depths == [0, 1, 4, 11]
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_a_lone_surrogate_is_refused_with_its_field_path(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**BASE, "jobs": [{"prompt": "ok", "seed": 1},
                                                 {"prompt": "a \ud800 b", "seed": 2, "negative_prompt": "\udfff"}]}))
    rc, out, seconds, mb = run_validate(path)
    assert rc == 2, out
    assert seconds < 5 and mb < 300, (seconds, mb)
    assert "jobs[1].prompt: not valid Unicode text: a lone UTF-16 surrogate at character 2" in out
    assert "jobs[1].negative_prompt: not valid Unicode text" in out and "jobs[0]" not in out
    assert lone_surrogate("a \ud83d\ude00 pair joined by the JSON parser is fine".encode(
        "utf-16", "surrogatepass").decode("utf-16")) is None
    assert lone_surrogate("x\ud800") == 1 and lone_surrogate("plain") is None


def test_a_huge_offending_value_is_echoed_short_and_cheaply():
    (text, problems), seconds, mb = measured("""
from jobs.validate import describe
huge = ["x" * 1000] * 100_000 + [{"k": "v" * 10**6}]
result = [describe(huge), problems_of({**BASE, "jobs": [{"prompt": "a", "seed": "v" * 10**6}]})]""")
    assert len(text) < 120 and text.startswith("(got list [")
    assert len(problems) == 1 and problems[0].startswith("jobs[0].seed: not an integer (got str 'vvv")
    assert len(problems[0]) < 200
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_a_prompt_past_the_limit_is_refused_with_its_path_and_echoed_short(tmp_path):
    """main before: a 5 MB prompt in a 1000-seed matrix validated, and every row would store it."""
    path = tmp_path / "m.json"
    prompt = "p" * 5_000_000
    path.write_text(json.dumps({**BASE, "jobs": [{"prompt": "fine", "seed": 1},
                                                 {"prompt": "ok", "seed": 2, "negative_prompt": "n" * 20_000}],
                                "matrix": {"prompts": [prompt], "seeds": {"count": 1000}}}))
    rc, out, seconds, mb = run_validate(path)
    assert rc == 2, out
    assert (f"matrix.prompts[0]: 5000000 characters, more than {MAX_PROMPT_CHARS} (jobs.limits.MAX_PROMPT_CHARS; "
            "set LORA_FARM_MAX_PROMPT_CHARS for more) (got str 'ppp") in out
    assert f"jobs[1].negative_prompt: 20000 characters, more than {MAX_PROMPT_CHARS}" in out
    assert "jobs[0]" not in out and len(out) < 2000, out  # the good job is fine; nothing echoed whole
    assert seconds < 5 and mb < 300, (seconds, mb)
    assert MAX_PROMPT_CHARS == 10_000
    path.write_text(json.dumps({**BASE, "jobs": [{"prompt": "p" * 20_000, "seed": 1}]}))
    rc, out, _, _ = run_validate(path, LORA_FARM_MAX_PROMPT_CHARS="30000")  # the operator raises it
    assert rc == 0 and "ok, 1 job(s)" in out, out


# ---- bounded reading: aliases, compression, totals ------------------------------------------
def laughs(levels: int = 9) -> str:
    """A "billion laughs" YAML document: a few hundred bytes that alias into 9**levels strings."""
    lines = ["model: {backend: tiny}", "x0: &x0 [" + ",".join(['"lol"'] * 9) + "]"]
    lines += [f"x{i}: &x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"jobs: [{{prompt: a, seed: 1, loras: *x{levels - 1}}}]"]) + "\n"


@pytest.mark.parametrize("index", range(len(YAML_LOADERS)), ids=[c.__name__ for c in YAML_LOADERS])
def test_every_yaml_loader_keeps_the_alias_nesting_and_character_guards(index):
    """libyaml's parser (the default where PyYAML has it) and PyYAML's own: the same guards, each
    in bounded time and memory (a fresh process per loader)."""
    texts = [laughs(), "jobs: &j [{prompt: a, loras: *j}]",
             "jobs: " + deep(1500),  # past libyaml's 1000 levels and Python's stack
             "x: [" + "1," * 2000 + "1]", "a: 1\nb: \"x\x07y\"\n", "a: &s [1, 2]\nb: *s\na: 3\n"]
    (outcomes, data), seconds, mb = measured(f"""
from jobs import sources
from jobs.limits import Problems
sources.MAX_YAML_NODES = 2000  # PyYAML's own parser takes a minute for the real 500,000
loader, outcomes, data = sources.YAML_LOADERS[{index}], [], None
for text in {texts!r}:
    problems = Problems()
    try:
        data = sources._parse_yaml(text, "m.yaml", problems, loader_class=loader)
    except RecursionError:  # parse() turns it into "nested too deeply to parse"
        problems.add("", "RecursionError")
    outcomes.append(problems.items)
result = [outcomes, data]""")
    assert outcomes == [
        [f"m.yaml: YAML aliases expand past {MAX_ALIAS_NODES} nodes (jobs.limits.MAX_ALIAS_NODES)"],
        ["m.yaml: YAML alias inside the value it names (jobs.limits.MAX_ALIAS_NODES)"],
        ["RecursionError"],
        ["m.yaml: more than 2000 YAML nodes (jobs.limits.MAX_YAML_NODES; set LORA_FARM_MAX_YAML_NODES "
         "for more, or give a big job list as JSONL or Parquet)"],
        ["m.yaml: invalid YAML: unacceptable character #x0007 at line 2, column 6: "
         "control characters are not allowed in YAML"],
        ["m.yaml: line 3: duplicate key 'a'"],  # and what is fine still loads
    ]
    assert data == {"a": 3, "b": [1, 2]}
    assert seconds < 10 and mb < 300, (seconds, mb)


def test_yaml_aliases_that_expand_are_a_manifest_problem(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs())
    rc, out, seconds, mb = run_validate(path, timeout=60)  # main before: walked 9**9 nodes, never ended
    assert rc == 2, out
    assert f"{path}: YAML aliases expand past {MAX_ALIAS_NODES} nodes (jobs.limits.MAX_ALIAS_NODES)" in out
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_a_yaml_alias_inside_its_own_value_is_refused_and_sparing_aliases_are_fine(tmp_path):
    problems, seconds, mb = measured("""
from jobs.limits import Problems
from jobs.sources import parse
p = Problems()
result = [parse("m.yaml", b"jobs: &j [{prompt: a, loras: *j}]", "m.yaml", p), p.items]""")
    assert problems == [None, ["m.yaml: YAML alias inside the value it names (jobs.limits.MAX_ALIAS_NODES)"]]
    assert seconds < 5 and mb < 300, (seconds, mb)
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
    rc, out, seconds, mb = run_validate(path, LORA_FARM_MAX_MANIFEST_MB="1")
    assert rc == 2 and f"{path}: cannot read: TooLargeError: holds more than 1 MiB" in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)
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
    problems, seconds, mb = measured(f"""
result = problems_of({{**BASE, "jobs": [{{"prompt": "a", "seed": 1}}, {{"prompt": "a", "seed": 2}}],
                      "matrix": {{"prompts": ["b"], "seeds": {{"count": {MAX_JOBS - 1}}}}}}})""")
    assert problems == [f"matrix: expands to {MAX_JOBS - 1} jobs (limit {MAX_JOBS} per manifest, "
                        "2 taken by jobs)"]  # jobs and matrices share one limit
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_a_jobs_list_or_file_past_the_job_limit_is_refused_before_any_job_is_checked(tmp_path):
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("{}\n" * (MAX_JOBS + 1))  # main before: a million "prompt: required" problems
    rc, out, seconds, mb = run_validate(jsonl)
    assert rc == 2, out
    assert f"{jsonl}: {MAX_JOBS + 1} jobs (limit {MAX_JOBS} per manifest, jobs.limits.MAX_JOBS)" in out
    assert out.count("\n") < 5 and seconds < 5 and mb < 300, (seconds, mb)
    problems, seconds, mb = measured(f"""
result = problems_of({{**BASE, "jobs": [{{}}] * {MAX_JOBS + 1}}})""")  # a list in the manifest itself
    assert problems == [f"jobs: {MAX_JOBS + 1} jobs (limit {MAX_JOBS} per manifest, jobs.limits.MAX_JOBS)"]
    assert seconds < 5 and mb < 300, (seconds, mb)
    rows = tmp_path / "jobs.parquet"
    pq.write_table(pa.table({"prompt": pa.DictionaryArray.from_arrays(pa.array([0] * (MAX_JOBS + 1), pa.int32()),
                                                                      pa.array(["a"]))}), rows)
    rc, out, seconds, mb = run_validate(rows)
    assert rc == 2 and f"{rows}: {MAX_JOBS + 1} jobs (limit {MAX_JOBS} per manifest" in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)


def test_a_parquet_jobs_file_that_decodes_past_the_limit_is_refused_before_any_row_is_read(tmp_path):
    n, long = 40_000, "a long prompt " * 700  # 9.8 KB (under MAX_PROMPT_CHARS), stored once, 392 MB in all rows
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
    problems, seconds, mb = measured("""
result = problems_of({**BASE, "storage_options": {"k" * 10**6: {}},
                      "jobs": [{"prompt": "a", "seed": 1, "x" * 10**6: 1}] + [{"seed": 1}] * 5000})""")
    assert seconds < 5 and mb < 300, (seconds, mb)
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
    rc, out, seconds, mb = run_validate(path)
    assert rc == 2 and "Traceback" not in out, out  # main before: ValueError from int() or repr()
    assert seconds < 5 and mb < 300, (seconds, mb)
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


# ---- raw control characters, YAML's cost ---------------------------------------------------------

@pytest.mark.parametrize("loader", YAML_LOADERS, ids=lambda c: c.__name__)
def test_a_control_character_after_non_ascii_text_is_placed_in_characters(loader):
    """libyaml reports a byte offset: after 300 CJK characters (900 bytes) it named line 3,
    column 599 of a 2-line text (found by a review)."""
    problems = Problems()
    _parse_yaml("a: " + "字" * 300 + "\nb: x\x07y\n", "m", problems, loader_class=loader)
    assert any("unacceptable character #x0007 at line 2, column 5" in str(p) for p in problems.items), problems.items


@pytest.mark.parametrize("char", ["\x00", "\x07"])
def test_a_raw_control_character_is_a_manifest_problem_with_its_place(tmp_path, char):
    """main before: yaml.reader.ReaderError escaped the parser (a traceback, exit 1)."""
    code = f"#x{ord(char):04x}"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"model: {{backend: tiny}}\noutput: out\njobs: [{{prompt: \"a{char}b\", seed: 1}}]\n")
    rc, out, seconds, mb = run_validate(manifest)
    assert rc == 2 and "Traceback" not in out, out
    assert f"{manifest}: invalid YAML: unacceptable character {code} at line 3, column 19" in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)
    (tmp_path / "jobs.yaml").write_text(f"- {{prompt: ok, seed: 1}}\n- {{prompt: \"x{char}\", seed: 2}}\n")
    (tmp_path / "j.yaml").write_text("model: {backend: tiny}\noutput: out\njobs_file: jobs.yaml\n")
    rc, out, _, _ = run_validate(tmp_path / "j.yaml")
    assert rc == 2 and f"jobs_file: invalid YAML: unacceptable character {code} at line 2, column 14" in out, out
    farm = tmp_path / "farm.yaml"
    farm.write_text(f"pools:\n  - name: \"a{char}\"\n")
    with pytest.raises(FarmConfigError) as e:
        load_farm_config(str(farm))
    assert e.value.problems == [f"{farm}: invalid YAML: unacceptable character {code} at line 2, column 13: "
                                "control characters are not allowed in YAML"]
    rc, out, _, _, _ = run_measured("from farm.cli import main", f"rc = main(['up', '--config', {str(farm)!r}])")
    assert rc == 2 and f"{farm}: invalid YAML: unacceptable character {code}" in out and "Traceback" not in out, out


def yaml_jobs(count: int) -> str:
    """A YAML manifest of ``count`` short jobs, 5 nodes and about 68 bytes each."""
    line = "  - {prompt: a fairly ordinary prompt number %07d, seed: %d}\n"
    return "model: {backend: tiny}\noutput: out\njobs:\n" + "".join(line % (i, i) for i in range(count))


def test_a_yaml_past_its_byte_limit_is_refused_before_parsing_and_points_to_jsonl(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(yaml_jobs(130_000))  # main before: parsed whole, about a minute and 500 MB here
    size = path.stat().st_size
    assert size > MAX_YAML_BYTES
    rc, out, seconds, mb = run_validate(path)
    assert rc == 2, out
    assert (f"{path}: {size / (1 << 20):.1f} MiB of YAML, more than {MAX_YAML_BYTES >> 20} MiB "
            "(jobs.limits.MAX_YAML_BYTES; set LORA_FARM_MAX_YAML_MB for more, or give a big job list as JSONL or "
            "Parquet: jobs_file: jobs.jsonl)") in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)
    assert MAX_YAML_BYTES == 8 << 20 and MAX_YAML_NODES == 500_000
    path.write_text(yaml_jobs(20_000))  # 1.3 MB: the operator sets the limit
    rc, out, _, _ = run_validate(path, LORA_FARM_MAX_YAML_MB="1")
    assert rc == 2 and "MiB of YAML, more than 1 MiB" in out, out
    rc, out, _, _ = run_validate(path, LORA_FARM_MAX_YAML_MB="2")
    assert rc == 0 and "ok, 20000 job(s)" in out, out


def test_the_costliest_yaml_accepted_validates_in_bounded_time_and_memory(tmp_path):
    """At the limit: a flow list of MAX_YAML_NODES tiny nodes, a node per two bytes (the most nodes
    per byte; main before: 8 MiB of them were 4 million nodes, about a minute and 2 GB). One node
    more is refused at once. (A manifest of ordinary jobs at the limit, 100,000 of them, took
    16 s and 355 MB here, most of it checking the jobs: the same list in JSONL costs that too.)"""
    dense = tmp_path / "dense.yaml"
    dense.write_text("model: {backend: tiny}\nx: [" + "1," * (MAX_YAML_NODES - 10) + "1]\n")
    rc, out, seconds, mb = run_validate(dense, timeout=300)
    assert rc == 2 and "manifest: unknown field 'x'" in out, out  # parsed, then validated
    assert seconds < 60 and mb < 500, (seconds, mb)
    dense.write_text("model: {backend: tiny}\nx: [" + "1," * MAX_YAML_NODES + "1]\n")
    rc, out, seconds, mb = run_validate(dense)
    assert rc == 2 and f"more than {MAX_YAML_NODES} YAML nodes" in out, out
    assert seconds < 5 and mb < 300, (seconds, mb)
