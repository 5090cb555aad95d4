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


def pytest_sessionfinish(session, exitstatus):
    _status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _status and os.environ.get("LORA_FARM_NO_HARD_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status[-1])
