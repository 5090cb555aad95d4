"""benchmarks.service: the pure parts on made-up rows, and one tiny real stream (K=2, L=0, small R)
through both paths, checked for the result's shape and the invariants that hold at any speed
(model loads, compositions, every image rendered). No timing is asserted: the figures are the
benchmark's, in RESULTS.md.

The real stream uses one worker and one composition, so what the counters must read is fixed
by the workload alone, not by the policy's choices: a fresh worker composes once per manifest,
and a warm one holding the only composition never composes again.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import service as S
from benchmarks.common import write_section
from jobs.rows import ResultRow


def row(job: str, worker: str = "w0", key: str = "k", compose_s: float = 0.0, at: float = 0.0, status: str = "ok"):
    return ResultRow(job_id=job, status=status, worker_id=worker, composition_key=key, compose_s=compose_s,
                     finished_at=at, error="" if status == "ok" else "boom")


# ---- the workload --------------------------------------------------------------------------
def test_compositions_are_distinct_routing_keys_over_the_files():
    from jobs.manifest import routing_key_of, LoraRef

    files = ["/l/a.safetensors", "/l/b.safetensors", "/l/c.safetensors"]
    comps = S.compositions_of(files, 4)  # more compositions than files: strengths keep them apart
    keys = {routing_key_of(tuple(LoraRef(u, s) for u, s in c)) for c in comps}
    assert len(comps) == len(keys) == 4
    assert all(u in files for c in comps for u, _ in c)
    assert S.compositions_of(files[:1], 2)[0] == ((files[0], 0.5),)
    with pytest.raises(ValueError, match="no LoRA files"):
        S.compositions_of([], 1)


def test_manifests_share_compositions_and_differ_in_everything_else(tmp_path):
    comps = S.compositions_of(["/l/a.safetensors", "/l/b.safetensors"], 3)
    ms = S.make_manifests(3, 7, comps, {"backend": "sleep"}, str(tmp_path))
    assert len(ms) == 3 and len({m.output for m in ms}) == 3
    per = [{j.routing_key for j in m.jobs} for m in ms]
    assert per[0] == per[1] == per[2] and len(per[0]) == 3
    for m in ms:
        assert len(m.jobs) == 7 and m.model == {"backend": "sleep"}
        assert [tuple((r.uri, r.strength) for r in j.loras) for j in m.jobs] == [comps[j % 3] for j in range(7)]
    jobs = [j for m in ms for j in m.jobs]
    assert len({j.job_id for j in jobs}) == len({j.seed for j in jobs}) == len({j.prompt for j in jobs}) == 21


def test_first_batch_is_the_dispatchers_chunk():
    assert S.first_batch(max_batch=4, capacity=2) == 1
    assert S.first_batch(max_batch=4, capacity=8) == 4
    assert S.first_batch(max_batch=2, capacity=8) == 2
    assert S.first_batch(max_batch=4, capacity=1) == 1


# ---- reading rows and counters -------------------------------------------------------------
def test_image_times_are_from_submit_to_the_first_and_last_ok_row():
    rows = [row("a", at=105.0), row("b", at=101.5), row("c", at=99.0, status="failed"), row("d", at=103.0)]
    assert S.image_times(100.0, rows) == (1.5, 5.0)
    with pytest.raises(RuntimeError, match="no image"):
        S.image_times(0.0, [row("x", status="failed")])


def test_compose_events_count_a_batch_once_and_only_calls_that_composed():
    rows = [row("a", "w0", "A", 0.51), row("b", "w0", "A", 0.51),  # one batch: one composition
            row("c", "w0", "A", 0.0), row("d", "w1", "A", 0.49), row("e", "w0", "B", 0.5),
            row("f", "w1", "B", 0.7, status="failed")]
    assert S.compose_events(rows) == {("w0", "A", 0.51), ("w1", "A", 0.49), ("w0", "B", 0.5)}
    assert S.held_recomposed(rows, {"A"}) == 2
    assert S.held_recomposed(rows, {"B", "C"}) == 1
    assert S.held_recomposed(rows, set()) == 0


def test_probe_overhead_is_what_the_worker_did_not_spend():
    r = ResultRow(job_id="p", status="ok", fetch_s=0.25, compose_s=0.0, render_s=0.5, finished_at=11.0)
    assert S.probe_overhead(10.0, r) == pytest.approx(0.25)


def test_targets_bound_the_later_manifests_first_image():
    warm = {"dispatch_overhead_s": 0.05, "held_recomposed": 0,
            "manifests": [{"first_image_s": 9.0, "first_row": {"render_s": 0.1}},
                          {"first_image_s": 0.2, "first_row": {"render_s": 0.1}},
                          {"first_image_s": 0.3, "first_row": {"render_s": 0.4}}]}
    t = S.targets(warm, render_one_s=0.2, batch=1)  # the sleep backend: R, not the rows' render
    bound = S.FIRST_IMAGE_SLACK * 0.25
    assert t["first_image_bounds_s"] == pytest.approx([bound, bound]) and t["first_images_s"] == [0.2, 0.3]
    assert t["first_image_ratios"] == pytest.approx([0.2 / bound, 0.3 / bound])
    assert t["first_image_met"] is False and t["first_image_median_met"] is True  # one of two over its bound
    t3 = S.targets({**warm, "manifests": warm["manifests"] + [{"first_image_s": 0.29}]}, render_one_s=0.2, batch=1)
    assert t3["first_image_met"] is False and t3["first_image_median_met"] is False  # two of three over
    assert t["held_recomposed_met"] is True  # manifest 1 (9 s, nothing held) is not judged
    t = S.targets({**warm, "held_recomposed": 1}, render_one_s=None, batch=2)  # a real model: its first row's render
    assert t["first_image_bounds_s"] == pytest.approx([S.FIRST_IMAGE_SLACK * 0.25, S.FIRST_IMAGE_SLACK * 0.85])
    assert t["first_image_met"] is True and t["held_recomposed_met"] is False


# ---- one real stream, both paths -------------------------------------------------------------
K, JOBS, WORKERS = 2, 3, 1


@pytest.fixture(scope="module")
def result():
    return S.run(manifests=K, jobs_per=JOBS, compositions=1, workers=WORKERS, render_s=0.02, compose_s=0.05,
                 load_s=(0.0,), tiny_manifests=0)


def test_every_image_is_rendered_both_ways_and_json_carries_it(result):
    json.dumps(result)
    assert result["params"]["manifests"] == K and result["first_batch"] == 1 and len(result["load_average"]) == 2
    (s,) = result["sets"]
    assert s["load"] == "0" and s["model"]["backend"] == "sleep" and s["manifests"] == K
    for mode in ("one_shot", "warm"):
        ms = s[mode]["manifests"]
        assert len(ms) == K
        for m in ms:
            assert m["ok"] == m["jobs"] == JOBS
            assert 0 < m["first_image_s"] <= m["last_image_s"] <= m["wall_s"]
        assert s[mode]["stream_wall_s"] == pytest.approx(sum(m["wall_s"] for m in ms))
    assert len(s["warm"]["dispatch_overheads_s"]) == S.PROBES and s["warm"]["up_s"] > 0


def test_one_shot_loads_the_model_and_composes_again_for_every_manifest(result):
    cold = result["sets"][0]["one_shot"]
    assert [m["model_loads"] for m in cold["manifests"]] == [WORKERS] * K
    assert cold["model_loads"] == K * WORKERS
    assert [m["compositions"] for m in cold["manifests"]] == [1] * K  # fresh worker, one composition
    assert cold["cross_manifest_recompositions"] == K - 1


def test_warm_farm_loads_once_at_up_and_never_recomposes_what_it_holds(result):
    s = result["sets"][0]
    warm = s["warm"]
    assert warm["workers"] == WORKERS and warm["model_loads_at_up"] == WORKERS
    assert warm["model_loads"] == 0 and all(m["model_loads"] == 0 for m in warm["manifests"])
    assert warm["compositions_first"] == warm["manifests"][0]["compositions"] == 1
    assert warm["cross_manifest_recompositions"] == 0
    assert [m["held_at_submit"] for m in warm["manifests"]] == [0] + [1] * (K - 1)
    assert [m["compose_events"] for m in warm["manifests"]] == [1] + [0] * (K - 1)
    assert warm["held_recomposed"] == 0 and s["targets"]["held_recomposed_met"] is True
    assert isinstance(s["targets"]["first_image_met"], bool) and isinstance(s["targets"]["first_image_median_met"], bool)
    assert len(s["targets"]["first_images_s"]) == K - 1
    assert s["stream_ratio"] > 0


def test_the_section_names_the_command_and_every_row(result, tmp_path):
    text = S.markdown(result, "python -m benchmarks.service --manifests 2")
    assert text.startswith(f"## {S.TITLE}\n") and "`python -m benchmarks.service --manifests 2`" in text
    assert "| 0 | one-shot |" in text and "| 0 | warm |" in text
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Other\n\nstays\n")
    write_section(text, str(path))
    body = path.read_text()
    assert "stays" in body and body.count(f"## {S.TITLE}") == 1


def test_main_prints_the_json_object(result, monkeypatch, capsys):
    seen = {}

    def fake_run(*args):
        seen["args"] = args
        return json.loads(json.dumps(result))

    monkeypatch.setattr(S, "run", fake_run)
    assert S.main(["--manifests", "4", "--load-s", "0", "5", "--tiny-manifests", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "python -m benchmarks.service --manifests 4 --load-s 0 5 --tiny-manifests 0 --json"
    assert seen["args"][0] == 4 and list(seen["args"][6]) == [0.0, 5.0] and seen["args"][8] == 0
