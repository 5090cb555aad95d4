"""Images that carry their job's identity, so a rerun records them instead of rendering again."""
from __future__ import annotations

import dataclasses
import io
import os

import pytest
from PIL import Image

from jobs import ResultsWriter, image_uri, validate_manifest
from jobs.results import ResultRow
from storage.output import write_bytes_atomic
from jobs.stamp import RECOVERED, STAMP_READ_BYTES, read_stamp, recover_rows, render_id, stamp_png

MODEL = {"backend": "tiny"}


def jobs():
    return validate_manifest({"defaults": {"width": 64, "height": 64, "steps": 2}, "jobs": [
        {"id": f"j{i}", "prompt": f"a cat {i}", "seed": i,
         "loras": [{"uri": "s3://b/style.safetensors", "strength": 0.5, "sha256": "ab" * 32}] if i else []}
        for i in range(4)]}).jobs


def png(seed: int = 0, size: int = 64) -> bytes:
    img = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3) if seed < 0 else bytes([seed]) * size * size * 3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_the_stamp_rides_in_a_valid_png_and_reads_from_its_first_bytes():
    job = jobs()[1]
    raw = png(-1, 256)  # noise: a PNG far larger than the bytes read for the stamp
    stamped = stamp_png(raw, job, MODEL, composition_key="k1", lora_mode="merge")
    assert len(stamped) > 10 * STAMP_READ_BYTES
    back = Image.open(io.BytesIO(stamped))
    back.load()  # CRCs and chunk order still valid for a real decoder
    assert back.tobytes() == Image.open(io.BytesIO(raw)).tobytes()
    assert read_stamp(stamped[:STAMP_READ_BYTES]) == {"job_id": "j1", "render": render_id(job, MODEL), "key": "k1",
                                                      "mode": "merge"}
    assert read_stamp(raw[:STAMP_READ_BYTES]) is None and read_stamp(b"not a png") is None
    broken = bytearray(stamped)
    broken[40] ^= 0xFF  # inside the stamp: its CRC no longer matches
    assert read_stamp(bytes(broken[:STAMP_READ_BYTES])) is None


def test_the_render_id_changes_with_everything_that_changes_the_picture():
    job = jobs()[1]
    base = render_id(job, MODEL)
    lora = dataclasses.replace(job.loras[0], strength=0.6)
    for other in [dataclasses.replace(job, prompt="a dog"), dataclasses.replace(job, seed=9),
                  dataclasses.replace(job, width=128), dataclasses.replace(job, steps=3),
                  dataclasses.replace(job, guidance=1.5), dataclasses.replace(job, negative_prompt="blur"),
                  dataclasses.replace(job, loras=(lora,)), dataclasses.replace(job, loras=())]:
        assert render_id(other, MODEL) != base
    assert render_id(job, {"backend": "diffusers", "path": "x"}) != base
    assert render_id(dataclasses.replace(job, priority=5), MODEL) == base, "priority does not change the picture"


@pytest.mark.parametrize("memory", [False, True])
def test_images_without_rows_are_recovered_only_when_their_stamp_matches(tmp_path, memory):
    root = f"memory://stamp-{tmp_path.name}/out" if memory else str(tmp_path / "out")
    j0, j1, j2, j3 = jobs()
    for job in (j0, j1):  # written as a worker writes them; the driver died before their rows landed
        write_bytes_atomic(image_uri(root, job.job_id), stamp_png(png(1), job, MODEL, composition_key="k", lora_mode="merge"))
    other = dataclasses.replace(j2, prompt="another prompt")  # same id, another picture
    write_bytes_atomic(image_uri(root, j2.job_id), stamp_png(png(2), other, MODEL))
    write_bytes_atomic(image_uri(root, j3.job_id), png(3))  # no stamp (an older farm's image)
    got = recover_rows(root, [j0, j1, j2, j3], MODEL, rows=[])
    assert [(r.job_id, r.status, r.worker_id, r.composition_key, r.lora_mode) for r in got] == [
        ("j0", "ok", RECOVERED, "k", "merge"), ("j1", "ok", RECOVERED, "k", "merge")]
    assert got[1].prompt == j1.prompt and got[1].output_uri == image_uri(root, "j1")
    assert recover_rows(root, [j0, j1], {"backend": "diffusers", "path": "m"}, rows=[]) == [], "another model"
    # a job with a row (failed or ok) is the table's to decide, not the image's
    have = [ResultRow.failed(j0, "boom"), ResultRow(job_id="j1", status="ok")]
    assert recover_rows(root, [j0, j1], MODEL, rows=have) == []
    writer = ResultsWriter(root)
    writer.append(got)
    writer.finalize()
    from jobs import completed_jobs

    assert completed_jobs(root) == {"j0", "j1"}
