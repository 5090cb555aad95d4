"""Suite-wide settings.

After the whole suite has run and pytest has printed its summary, the interpreter's own
teardown has been seen to segfault (exit 139) once Ray, torch's thread pools, spawned
multiprocessing children and aiohttp have all been loaded in one process, even with every
test passing; no subset reproduces it. We therefore end the process with pytest's own
exit status right after the summary, skipping native-library teardown. Failures still
fail: the status is pytest's.
"""
from __future__ import annotations

import os
import sys

import pytest

_status: list[int] = []


@pytest.fixture(scope="session", autouse=True)
def _lora_root_is_pytest_tmp(tmp_path_factory):
    """The suite is the operator here: its LoRA files live under pytest's temp dir (often
    next to, not under, the manifest that names them), so it allows that dir as a LoRA
    root (``storage.policy``), as an operator sets ``$LORA_FARM_LORA_ROOTS``. The policy's
    own tests set or clear the variable themselves."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_FARM_LORA_ROOTS", str(tmp_path_factory.getbasetemp()))
    yield
    mp.undo()


def pytest_sessionfinish(session, exitstatus):
    _status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _status and os.environ.get("LORA_FARM_NO_HARD_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status[-1])
