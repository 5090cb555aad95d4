"""ActiveRun without Ray: rows buffered until their part is written, never dropped by a failed write."""
from __future__ import annotations

from farm.service.runs import ActiveRun
from farm.service.state import RunRecord
from jobs.manifest import validate_manifest
from jobs.results import ResultRow, read_results


class FlakyWriter:
    def __init__(self, real):
        self.real, self.fail = real, 1

    def append(self, rows):
        if self.fail:
            self.fail -= 1
            raise OSError("the store said no")
        return self.real.append(rows)


def test_a_failed_flush_keeps_the_rows_for_the_next(tmp_path):
    from jobs.results import ResultsWriter

    m = validate_manifest({"model": {"backend": "tiny"}, "output": str(tmp_path / "out"),
                           "jobs": [{"prompt": f"p{i}", "seed": i} for i in range(3)]})
    run = ActiveRun(RunRecord("r-1", {}, m.output), m, None, FlakyWriter(ResultsWriter(m.output)), set())
    run.on_rows([ResultRow.ok(j, output_uri="x", composition_key="base", worker_id="w", fetch_s=0, compose_s=0,
                              render_s=1, lora_mode="merge") for j in m.jobs])
    try:
        run.flush()
    except OSError:
        pass
    assert len(run.buffer) == 3, "rows stay buffered when their part could not be written"
    run.flush()
    assert run.buffer == [] and sorted(r.job_id for r in read_results(m.output)) == sorted(j.job_id for j in m.jobs)
    assert run.ok == {j.job_id for j in m.jobs}
