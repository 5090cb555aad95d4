"""The service commands with no farm up: a clear line and exit 1, nothing started; a stale
record of a local head (its processes gone) counts as no farm."""
from __future__ import annotations

import json
import os

import pytest

from farm.cli import main as farm_main
from farm.service import local


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FARM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("argv", [["status"], ["status", "r-0123"], ["cancel", "r-0123"], ["workers", "--json"],
                                  ["down"]])
def test_commands_say_no_farm_is_up(home, capsys, argv):
    assert farm_main(argv) == 1
    err = capsys.readouterr().err
    assert "no farm is up on this machine" in err and "farm up --config" in err


def test_a_stale_local_record_is_no_farm(home, capsys):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a process group id nobody holds any more
    home.mkdir(parents=True, exist_ok=True)
    (home / "local.json").write_text(json.dumps({"address": "127.0.0.1:1", "pgid": dead, "temp_dir": "/nonexistent"}))
    assert local.recorded() is None
    assert farm_main(["status"]) == 1


def test_submit_with_no_farm_keeps_the_manifest_check(home, tmp_path, capsys):
    bad = tmp_path / "m.yaml"
    bad.write_text("model: {backend: nope}\njobs: []\n")
    assert farm_main(["submit", str(bad)]) == 2  # a bad manifest is exit 2 before any farm is looked for
    assert "model.backend" in capsys.readouterr().err
