"""benchmarks.overlap runs end to end on a small case and writes only its own section (no speed
asserted here: the numbers are the benchmark's, in RESULTS.md)."""
from __future__ import annotations

from benchmarks import overlap
from benchmarks.common import write_section


def test_small_run_renders_every_image_both_ways_and_writes_its_section(tmp_path):
    r = overlap.run(render_s=0.05, images=3, size=32, chunk=2)
    for name, flag in (("serial", False), ("overlapped", True)):
        m = r[name]
        assert m["overlap_output"] is flag and m["writes"] == 3 and m["images_per_s"] > 0 and m["write_s_mean"] > 0
    assert r["target_images_per_s"] == 0.9 / 0.05 and isinstance(r["target_met"], bool)
    text = overlap.markdown(r, "python -m benchmarks.overlap --images 3")
    assert text.startswith(overlap.TITLE + "\n") and "| serial (`overlap_output=False`) |" in text
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Other\n\nstays\n")
    write_section(text, str(path))
    assert "stays" in path.read_text() and overlap.TITLE in path.read_text()
