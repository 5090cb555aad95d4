"""`farm up` whose workers cannot load their model: it says which worker and why, exits 1, and
does not wait forever (a real head on loopback; the model's path does not exist)."""
from __future__ import annotations

import yaml

from farm.cli import main as farm_main
from tests.farm.conftest import start_ray_head


def test_up_reports_a_model_that_does_not_load(tmp_path, capsys):
    import ray

    config = tmp_path / "farm.yaml"
    config.write_text(yaml.safe_dump({
        "pools": [{"name": "sd", "model": {"backend": "diffusers", "path": str(tmp_path / "no-such-model")},
                   "workers": 1}],
        "state": str(tmp_path / "state")}))
    with start_ray_head(num_gpus=1) as head:
        try:
            assert farm_main(["up", "--config", str(config), "--address", head.address]) == 1
            err = capsys.readouterr().err
            assert "lora-farm-sd-0 could not load its model" in err and "no-such-model" in err
        finally:
            farm_main(["down", "--now", "--address", head.address])
            if ray.is_initialized():
                ray.shutdown()
