"""The demo's trained LoRAs reach the rendered image, through the real farm (a local Ray
cluster, the tiny trained model), in merge and in low-rank mode.

Each LoRA was trained for one effect a person can name (``training.shapes``); each has an
image-space measure (``testsupport.image_measures``). For every LoRA: its measure moves
from the base images by a margin at strength 1, part of the way at strength 0.75, and the
other LoRAs leave it where it was, so a composition rendered with the wrong LoRA (or with
none) fails here.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from farm import runner
from jobs.manifest import load_manifest
from jobs.results import read_results
from testsupport.image_measures import MEASURES
from training.evaluate import cases
from training.shapes import prompt_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORAS = os.path.join(ROOT, "examples", "loras")
# prompts of the dataset the model and its LoRAs were trained on, drawn once (training.evaluate.cases)
PROMPTS = [prompt_of(*c) for c in cases(12)]
SEEDS = [1]
STRENGTHS = (0.75, 1.0)
# the least each LoRA's own measure must move at strength 1 (mean over the pictures); set from
# what the trained LoRAs do (`python -m training.evaluate`, benchmarks/RESULTS.md), with room
MARGIN = {"palette": 1.0, "stripes": 0.05, "snowman": 0.12}


def lora_sets(loras_dir):
    yield "base", []
    for name in MEASURES:
        for s in STRENGTHS:
            yield f"{name}@{s}", [{"uri": str(loras_dir / f"{name}.safetensors"), "strength": s}]


@pytest.fixture(scope="module", params=["merge", "lowrank"])
def measured(request, ray_cluster, tmp_path_factory):
    """{composition label: {measure: mean over prompts x seeds}} of one farm run."""
    tmp = tmp_path_factory.mktemp(f"demo-{request.param}")
    os.makedirs(tmp / "loras")
    for name in MEASURES:  # beside the manifest, as a user has them
        shutil.copy(os.path.join(LORAS, f"{name}.safetensors"), tmp / "loras")
    jobs, label_of = [], {}
    for label, loras in lora_sets(tmp / "loras"):
        for pi, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                jid = f"{label.replace('@', '-')}-p{pi}-s{seed}"
                label_of[jid] = label
                jobs.append({"id": jid, "prompt": prompt, "seed": seed, "loras": loras})
    manifest = {"model": {"backend": "tiny"}, "defaults": {"steps": 8, "width": 128, "height": 128},
                "output": str(tmp / "out"), "options": {"lora_mode": request.param}, "jobs": jobs}
    path = tmp / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    m = load_manifest(str(path))
    s = runner.run_manifest(m, workers=2, progress=False)
    assert (s.ok, s.failed) == (len(jobs), 0)
    values: dict[str, dict[str, list[float]]] = {}
    for row in read_results(m.output):
        if label_of[row.job_id] != "base":  # rendered the way the farm was told to
            assert row.lora_mode == request.param, (row.job_id, row.lora_mode)
        img = np.asarray(Image.open(row.output_uri).convert("RGB"))
        for name, f in MEASURES.items():
            values.setdefault(label_of[row.job_id], {}).setdefault(name, []).append(f(img, row.prompt))
    return {label: {k: float(np.mean(v)) for k, v in per.items()} for label, per in values.items()}


@pytest.mark.parametrize("name", list(MEASURES))
def test_each_lora_moves_its_own_measure_and_scales_with_strength(measured, name):
    base = measured["base"][name]
    part, full = measured[f"{name}@0.75"][name] - base, measured[f"{name}@1.0"][name] - base
    assert full > MARGIN[name], f"{name} at strength 1 moved its measure {full:.3f} (base {base:.3f}): {measured}"
    # part-way, not all the way: the stripes appear late (at 0.5 they barely show), the others sooner
    assert 0.1 * full < part < 0.95 * full, f"{name}: strength 0.75 moved it {part:.3f}, strength 1 {full:.3f}"


@pytest.mark.parametrize("name", list(MEASURES))
def test_other_loras_leave_a_measure_alone(measured, name):
    """The measure of one LoRA's effect tells its images from every other LoRA's: a
    composition rendered with the wrong LoRA, or none, is caught."""
    base = measured["base"][name]
    own = measured[f"{name}@1.0"][name] - base
    for other in MEASURES:
        if other != name:
            moved = measured[f"{other}@1.0"][name] - base
            assert abs(moved) < own / 3, f"{other} moved {name}'s measure {moved:.3f} (its own LoRA: {own:.3f})"
