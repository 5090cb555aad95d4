"""The farm commands as a user runs them: separate `farm` processes whose environment sets none
of Ray's variables (the tests' conftest sets them for this process, which hid a bug: Ray reads
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import and then maps 127.0.0.1 to the outbound IP)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

FARM = os.path.join(os.path.dirname(sys.executable), "farm")


def test_up_status_workers_down_in_fresh_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["LORA_FARM_HOME"] = str(tmp_path / "home")
    config = tmp_path / "farm.yaml"
    config.write_text(yaml.safe_dump({"pools": [{"name": "tiny", "model": {"backend": "tiny"}, "workers": 1}],
                                      "state": str(tmp_path / "state")}))

    def farm(*argv, timeout=180):
        return subprocess.run([FARM, *argv], env=env, capture_output=True, text=True, timeout=timeout)

    try:
        up = farm("up", "--config", str(config))
        assert up.returncode == 0, up.stderr[-2000:]
        assert json.loads(up.stdout)["workers"] == {"tiny": [1, 1]}
        st = farm("status", "--json")
        assert st.returncode == 0 and json.loads(st.stdout) == [], st.stderr[-2000:]
        ws = farm("workers", "--json")
        assert ws.returncode == 0 and [w["worker_id"] for w in json.loads(ws.stdout)] == ["lora-farm-tiny-0"]
    finally:
        down = farm("down", "--now")
    assert down.returncode == 0 and "local Ray head" in down.stdout, down.stderr[-2000:]
    assert not (tmp_path / "home" / "local.json").exists()
