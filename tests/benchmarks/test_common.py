"""A benchmark rewrites its own section of RESULTS.md and nothing else: other sections and the section's
hand-written notes stay as they were."""
from __future__ import annotations

from benchmarks.common import NOTES, write_section


def test_a_rewrite_keeps_other_sections_and_the_sections_notes(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Benchmark results\n\n## A\n\nold numbers\n\n{NOTES}\nwhy they matter\n\n## B\n\nb stays\n")
    write_section("## A\n\nnew numbers\n", str(path))
    text = path.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert text.index("new numbers") < text.index("why they matter") < text.index("## B")
    assert text.count(NOTES) == 1 and "b stays" in text
    write_section("## B\n\nb changed\n", str(path))  # the last section, with no notes
    assert path.read_text().endswith("## B\n\nb changed\n") and "why they matter" in path.read_text()


def test_a_new_section_is_appended(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("## New\n\nfirst\n", str(path))
    assert path.read_text() == "# Benchmark results\n\n## New\n\nfirst\n"
