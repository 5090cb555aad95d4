"""Validation applies the LoRA URI policy: a reference the operator does not allow is a
manifest problem with its path (``jobs[i].loras[j].uri``), exit 2, before anything runs;
the manifest's own directory stays allowed (``farm run`` on one's machine is as before),
and only the operator (env, ``--lora-root``), never the manifest, adds roots."""
from __future__ import annotations

import os
import time

import pytest
import yaml

from farm.cli import main as farm_main
from jobs.manifest import ManifestError, load_manifest, validate_manifest
from storage.policy import LORA_HOSTS_ENV, LORA_PROTOCOLS_ENV, LORA_ROOTS_ENV

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


@pytest.fixture(autouse=True)
def no_operator_roots(monkeypatch):
    for name in (LORA_ROOTS_ENV, LORA_PROTOCOLS_ENV, LORA_HOSTS_ENV):  # the defaults, not the suite's root
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def layout(tmp_path):
    """``proj/m.yaml`` next to ``proj/loras/``; ``elsewhere/`` beside it; a symlink out."""
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "loras").mkdir(parents=True)
    elsewhere.mkdir()
    (proj / "loras" / "a.safetensors").write_bytes(b"x")
    (elsewhere / "b.safetensors").write_bytes(b"x")
    os.symlink("/etc/passwd", proj / "loras" / "passwd.safetensors")
    return proj, elsewhere


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def hostile(elsewhere) -> dict:
    return {"jobs": [
        {"id": "fine", "prompt": "p", "loras": ["loras/a.safetensors", {"uri": "s3://bucket/c.safetensors"}]},
        {"id": "passwd", "prompt": "p", "loras": ["loras/a.safetensors", "/etc/passwd"]},
        {"id": "escape", "prompt": "p", "loras": ["../../../../../../../etc/shadow"]},
        {"id": "proc", "prompt": "p", "loras": [{"uri": "file:///proc/self/environ", "strength": 0.5}]},
        {"id": "link", "prompt": "p", "loras": ["loras/passwd.safetensors"]},
        {"id": "away", "prompt": "p", "loras": [str(elsewhere / "b.safetensors")]},
        {"id": "cache", "prompt": "p", "loras": ["simplecache::s3://bucket/c.safetensors"]},
    ], "matrix": {"prompts": ["q"], "lora_sets": [["loras/a.safetensors"], [{"uri": "dir://x/y"}]]}}


def test_refused_uris_are_manifest_problems_with_their_paths(layout, capsys):
    proj, elsewhere = layout
    path = write(proj / "m.yaml", hostile(elsewhere))
    t0 = time.perf_counter()
    assert farm_main(["validate", path]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    expect = {
        "jobs[1].loras[1].uri": "under /etc", "jobs[2].loras[0].uri": "under /etc",
        "jobs[3].loras[0].uri": "under /proc", "jobs[4].loras[0].uri": "resolves to '/etc/passwd'",
        "jobs[5].loras[0].uri": "not under an allowed LoRA root", "jobs[6].loras[0].uri": "protocol 'simplecache'",
        "matrix.lora_sets[1][0].uri": "protocol 'dir'",
    }
    lines = [line.strip() for line in err.splitlines() if "URI policy" in line]
    assert len(lines) == len(expect), err
    for where, rule in expect.items():
        assert any(line.startswith(f"{where}: ") and rule in line for line in lines), (where, err)
    assert str(elsewhere / "b.safetensors") in err and "jobs[0]" not in err, "the allowed ones are not reported"
    assert "farm run --lora-root" in err, "the message says how the operator allows more"


def test_the_manifest_dir_is_allowed_by_default_and_the_examples_validate(layout):
    proj, _ = layout
    m = load_manifest(write(proj / "m.yaml", {"jobs": [{"prompt": "p", "loras": ["loras/a.safetensors"]}]}))
    assert m.jobs[0].loras[0].uri == str(proj / "loras" / "a.safetensors")
    for name in sorted(os.listdir(EXAMPLES)):  # `make demo` and every example, with no roots configured
        if name.endswith((".yaml", ".yml", ".json")):
            assert load_manifest(os.path.join(EXAMPLES, name)).jobs, name


def test_only_the_operator_adds_roots(layout, monkeypatch, capsys):
    proj, elsewhere = layout
    data = {"jobs": [{"prompt": "p", "loras": [str(elsewhere / "b.safetensors")]}]}
    path = write(proj / "m.yaml", data)
    with pytest.raises(ManifestError):
        load_manifest(path)
    # a manifest cannot widen its own policy: there is no field for it
    with pytest.raises(ManifestError, match="unknown field 'lora_roots'"):
        validate_manifest({**data, "lora_roots": [str(elsewhere)]}, base_dir=str(proj))
    with pytest.raises(ManifestError, match="unknown field 'lora_roots'"):
        validate_manifest({**data, "options": {"lora_roots": [str(elsewhere)]}}, base_dir=str(proj))
    monkeypatch.setenv(LORA_ROOTS_ENV, str(elsewhere))
    assert load_manifest(path).jobs[0].loras[0].uri == str(elsewhere / "b.safetensors")
    monkeypatch.delenv(LORA_ROOTS_ENV)
    # `farm run --lora-root DIR`: validation sees it (a still-bad LoRA keeps this at exit 2, before Ray)
    write(proj / "m.yaml", {"jobs": [{"prompt": "p", "loras": [str(elsewhere / "b.safetensors")]},
                                     {"prompt": "q", "loras": ["/etc/passwd"]}]})
    assert farm_main(["run", path, "--no-progress"]) == 2
    assert "jobs[0].loras[0].uri" in capsys.readouterr().err
    assert farm_main(["run", path, "--no-progress", "--lora-root", str(elsewhere)]) == 2
    err = capsys.readouterr().err
    assert "jobs[0]" not in err and "jobs[1].loras[0].uri" in err
    assert LORA_ROOTS_ENV not in os.environ, "the flag leaves the process environment as it was"


def test_a_manifest_built_in_code_is_anchored_at_the_working_dir(layout, monkeypatch):
    proj, elsewhere = layout
    monkeypatch.chdir(proj)
    m = validate_manifest({"jobs": [{"prompt": "p", "loras": ["loras/a.safetensors"]}]})
    assert m.base_dir is None and m.jobs[0].loras[0].uri == "loras/a.safetensors"
    with pytest.raises(ManifestError, match=r"jobs\[0\]\.loras\[0\]\.uri: .*not under an allowed LoRA root"):
        validate_manifest({"jobs": [{"prompt": "p", "loras": [str(elsewhere / "b.safetensors")]}]})


def test_remote_references_follow_the_operator_protocols(layout, monkeypatch):
    proj, _ = layout
    data = {"jobs": [{"prompt": "p", "loras": ["https://hub.example/a.safetensors", "s3://b/a.safetensors"]}]}
    assert validate_manifest(data, base_dir=str(proj)).jobs  # the default: every remote protocol
    monkeypatch.setenv(LORA_PROTOCOLS_ENV, "s3")
    with pytest.raises(ManifestError) as e:
        validate_manifest(data, base_dir=str(proj))
    assert e.value.problems == [e.value.problems[0]] and e.value.problems[0].startswith("jobs[0].loras[0].uri: ")
    assert "protocol 'https'" in e.value.problems[0]


def test_many_local_references_validate_quickly(layout):
    proj, _ = layout
    jobs = [{"prompt": f"p{i}", "loras": [f"loras/l{i % 50}.safetensors"]} for i in range(20000)]
    t0 = time.perf_counter()
    assert len(validate_manifest({"jobs": jobs}, base_dir=str(proj)).jobs) == 20000
    assert time.perf_counter() - t0 < 10


# ---- jobs_file: the same policy, no echo, a bounded read -------------------------------------------
SECRET = "DB_PASSWORD=hunter2: {x\nAWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI\n"


def test_a_jobs_file_under_a_denied_root_is_refused_before_it_is_read(layout, capsys):
    """main before: /proc/self/environ was read and parsed (a ReaderError traceback, exit 1)."""
    proj, _ = layout
    path = write(proj / "m.yaml", {"model": {"backend": "tiny"}, "output": "out", "jobs_file": "/proc/self/environ"})
    assert farm_main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "jobs_file: refused by the farm's URI policy (as for LoRAs): '/proc/self/environ'" in err, err
    assert "under /proc" in err and "Traceback" not in err


def test_a_jobs_file_that_is_no_job_list_never_echoes_its_lines(layout, capsys):
    """main before: the YAML error quoted the line ("DB_PASSWORD=hunter2: {x"), and a mapping was
    echoed as the value that is not a list. Now: what is wrong and where, none of the text."""
    proj, _ = layout
    (proj / "secret.env").write_text(SECRET)
    (proj / "settings.yaml").write_text("DB_PASSWORD: hunter2\nAWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI\n")
    for name, reason in [("secret.env", "invalid YAML: while parsing a flow mapping did not find expected ',' or '}' "
                                        "at line 2, column 22"),
                         ("settings.yaml", f"{proj / 'settings.yaml'} holds no job list (got a dict)")]:
        path = write(proj / "m.yaml", {"model": {"backend": "tiny"}, "output": "out", "jobs_file": name})
        assert farm_main(["validate", path]) == 2
        err = capsys.readouterr().err
        assert f"jobs_file: {reason}" in err, err
        assert "hunter2" not in err and "wJalr" not in err and "DB_PASS" not in err and "AWS_" not in err, err
    (proj / "jobs.yaml").write_text("jobs:\n  - {prompt: a, seed: 1}\n")  # what is a job list still loads
    m = load_manifest(write(proj / "m.yaml", {"model": {"backend": "tiny"}, "output": "out", "jobs_file": "jobs.yaml"}))
    assert [j.prompt for j in m.jobs] == ["a"]


def test_a_jobs_file_outside_the_manifest_dir_is_refused(layout):
    """The manifest's directory and the operator's roots, as for LoRAs (``read_jobs_file``'s base_dir)."""
    proj, elsewhere = layout
    (elsewhere / "jobs.jsonl").write_text('{"prompt": "a", "seed": 1}\n')
    from jobs.limits import Problems
    from jobs.sources import read_jobs_file

    problems = Problems()
    assert read_jobs_file(str(elsewhere / "jobs.jsonl"), None, problems, base_dir=str(proj)) is None
    (problem,) = problems.items
    assert problem.startswith("jobs_file: refused by the farm's URI policy (as for LoRAs): ")
    assert str(elsewhere / "jobs.jsonl") in problem and "not under an allowed LoRA root" in problem
    assert read_jobs_file(str(elsewhere / "jobs.jsonl"), None, Problems(), base_dir=str(elsewhere)) == [
        {"prompt": "a", "seed": 1}]
    path = write(proj / "m.yaml", {"model": {"backend": "tiny"}, "jobs_file": str(elsewhere / "jobs.jsonl")})
    with pytest.raises(ManifestError) as e:  # through load_manifest: needs jobs/manifest.py to pass base_dir
        load_manifest(path)
    assert any(p.startswith("jobs_file: refused by the farm's URI policy") for p in e.value.problems), e.value.problems


def test_a_jobs_file_over_the_network_is_cut_when_it_trickles(layout, monkeypatch):
    """main before: only fsspec's defaults (no rate floor): this trickle held validation 300 s, then
    an FSTimeoutError with no message. Now it is read as a LoRA is downloaded: cut after a window."""
    try:
        from tests.storage.servers import FaultyHTTPServer
    except ImportError:  # bare `pytest`
        pytest.skip("run from the repository root (python -m pytest)")
    from storage import fetch

    proj, _ = layout
    monkeypatch.setattr(fetch, "MIN_RATE_BYTES_S", 4096.0)  # a 1 s window of 4 KiB/s (the default: 30 s)
    monkeypatch.setattr(fetch, "RATE_WINDOW_S", 1.0)
    body = b"".join(b'{"prompt": "p%d", "seed": %d}\n' % (i, i) for i in range(300))
    with FaultyHTTPServer() as server:
        slow = server.add("/slow.jsonl", body, trickle_s=0.1)
        fine = server.add("/fine.jsonl", body)
        t0 = time.perf_counter()
        with pytest.raises(ManifestError) as e:
            load_manifest(write(proj / "m.yaml", {"model": {"backend": "tiny"}, "jobs_file": slow}))
        elapsed = time.perf_counter() - t0
        m = load_manifest(write(proj / "m.yaml", {"model": {"backend": "tiny"}, "jobs_file": fine}))
    (problem,) = e.value.problems
    assert problem.startswith(f"jobs_file: cannot read {slow}: SlowTransferError: transfer too slow"), problem
    assert elapsed < 20, elapsed  # a trickle of 300 lines would take 100 s
    assert len(m.jobs) == 300
