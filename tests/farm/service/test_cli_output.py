"""The test helper that reads a command's JSON where Ray's driver notices may be interleaved."""
from __future__ import annotations

import json

import pytest

from .cli import command_json

NOTICE = ("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected "
          "system error.\nRayTask ID: ffff\n Worker exit type: SYSTEM_ERROR\n")


@pytest.mark.parametrize("doc", [{"run_id": "r-1", "ok": 3, "output": "/x"}, [{"a": 1}, {"b": [2]}], []])
def test_the_document_is_found_around_notices(doc):
    text = json.dumps(doc, indent=1) + "\n"
    for noisy in (text, NOTICE + text, text + NOTICE, NOTICE + text + NOTICE):
        assert command_json(noisy) == doc


def test_no_document_is_an_error():
    with pytest.raises(AssertionError, match="no JSON document"):
        command_json(NOTICE)
    with pytest.raises(AssertionError):
        command_json("{not json\n")
