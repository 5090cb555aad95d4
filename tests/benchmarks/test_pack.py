"""benchmarks/pack.py on small shapes: both paths agree bit for bit and the section renders."""
from __future__ import annotations

from benchmarks import pack


def test_pack_benchmark_runs_and_checks_both_paths():
    rows = pack.run([48, 64], [16, 48], repeats=1)
    assert len(rows) == 2 * 2 * 2
    assert all(r["same"] for r in rows)
    assert all(r["index_us"] > 0 and r["two_step_us"] > 0 and r["copy_us"] > 0 for r in rows)
    text = pack.section(rows, 1)
    assert text.startswith("## Packing (nunchaku low-rank layout)")
    assert text.count("\n| 48 |") + text.count("\n| 64 |") == 8
    assert "bit-identical: yes" in text
