"""`farm submit --address http://HEAD:8265` with a farm up on that cluster: the Jobs API job hands
the manifest to the farm (stdout's first line is the farm's run id, not a Ray job id), and the
run renders on the farm's warm workers. A real `ray start --head` on loopback; the farm is
brought up on it with `farm up --address`."""
from __future__ import annotations

import yaml

from farm.cli import main as farm_main
from jobs.results import read_results
from tests.farm.conftest import start_ray_head

from .cli import out_json


def test_jobs_api_submit_goes_to_the_farm(tmp_path, capsys):
    import ray

    config = tmp_path / "farm.yaml"
    config.write_text(yaml.safe_dump({"pools": [{"name": "tiny", "model": {"backend": "tiny"}, "workers": 1}],
                                      "state": str(tmp_path / "state")}))
    out = tmp_path / "out"
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                                 "output": str(out), "jobs": [{"prompt": f"p{i}", "seed": i} for i in range(3)]}))
    with start_ray_head(num_gpus=1) as head:
        try:
            assert farm_main(["up", "--config", str(config), "--address", head.address]) == 0
            capsys.readouterr()
            assert farm_main(["submit", str(m), "--address", head.url, "--wait", "--submitter", "carol"]) == 0
            first = capsys.readouterr().out.splitlines()[0].strip()
            assert first.startswith("r-"), first  # the farm's run id, not a raysubmit_ job id
            rows = read_results(str(out))
            assert sorted(r.status for r in rows) == ["ok"] * 3
            assert {r.worker_id for r in rows} == {"lora-farm-tiny-0"}  # the farm's worker rendered it
            st = out_json(capsys, ["status", first, "--address", head.address, "--json"])
            assert (st["state"], st["ok"], st["submitter"]) == ("done", 3, "carol")
        finally:
            farm_main(["down", "--now", "--address", head.address])
            if ray.is_initialized():
                ray.shutdown()
