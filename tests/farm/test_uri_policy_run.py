"""`farm run` on real Ray: the workers get the operator's URI policy from the runner, so
jobs added to a validated manifest by hand (the Python API) that reach /etc/passwd or
files outside the roots fail alone with ``ForbiddenUriError``; the others render, and a
root the operator adds (``run_manifest(lora_roots=...)``, ``farm run --lora-root``) lets
the outside file through on the rerun."""
from __future__ import annotations

import dataclasses
import os

import yaml

from farm import runner
from jobs.manifest import Job, LoraRef, load_manifest
from jobs.results import read_results
from storage.policy import LORA_ROOTS_ENV
from testsupport import lora as T
from tests.farm.test_run import tiny_shapes


def test_runner_hands_the_policy_to_the_workers(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv(LORA_ROOTS_ENV, raising=False)  # the default policy: the manifest's dir only
    proj, outside = tmp_path / "proj", tmp_path / "outside"
    (proj / "loras").mkdir(parents=True)
    outside.mkdir()
    layers = T.random_layers(tiny_shapes(("attn.to_q",)), rank=2, seed=1, scale=0.5)
    T.write_safetensors(proj / "loras" / "a.safetensors", T.peft_state_dict(layers))
    away = T.write_safetensors(outside / "b.safetensors", T.peft_state_dict(layers))
    (proj / "m.yaml").write_text(yaml.safe_dump({
        "model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64}, "output": "out",
        "jobs": [{"id": "base", "prompt": "a cat"}, {"id": "lora", "prompt": "a dog", "loras": ["loras/a.safetensors"]}]}))
    m = load_manifest(str(proj / "m.yaml"))
    template = m.jobs[0]
    extra = tuple(dataclasses.replace(template, job_id=jid, loras=(LoraRef(uri),))
                  for jid, uri in (("passwd", "/etc/passwd"), ("away", away)))
    hand_built = dataclasses.replace(m, jobs=m.jobs + extra)  # never validated
    assert isinstance(extra[0], Job) and hand_built.base_dir == str(proj)

    s = runner.run_manifest(hand_built, workers=1, progress=False)
    assert (s.ok, s.failed, s.exit_code) == (2, 2, 1)
    rows = {r.job_id: r for r in read_results(m.output)}
    assert set(rows) == {"base", "lora", "passwd", "away"}, "every job has its row"
    for jid, named in (("passwd", "/etc/passwd"), ("away", away)):
        assert rows[jid].error.startswith("ForbiddenUriError") and named in rows[jid].error, rows[jid].error
        assert rows[jid].attempts == 1, "refused, not retried"
    assert all(os.path.exists(rows[j].output_uri) for j in ("base", "lora"))

    again = runner.run_manifest(hand_built, workers=1, progress=False, lora_roots=[str(outside)])
    assert (again.ok, again.failed, again.skipped) == (1, 1, 2), "the operator's root lets 'away' through"
    rows = {r.job_id: r for r in read_results(m.output)}
    assert rows["away"].status == "ok" and rows["passwd"].error.startswith("ForbiddenUriError")
