"""Running farm commands in the test process and reading what they printed.

The commands run here, in one process with one Ray driver for many calls. Ray's driver has a
thread that prints the cluster's error notices ("(raylet) A worker died ...", often several
lines) to whatever ``sys.stdout`` is when they arrive. A real ``farm`` process sends them to
stderr for its whole life (``farm.cli._service``); here, between two commands, ``sys.stdout``
is pytest's capture, so a notice about an actor a test just killed can land in the middle of
the next command's captured stdout. ``command_json`` takes the command's JSON document out of
it: the one document ``client.emit`` writes in a single write, starting on a line of its own.
"""
from __future__ import annotations

import json
import re

from farm.cli import main as farm_main


def command_json(text: str):
    decoder = json.JSONDecoder()
    for start in re.finditer(r"^[\[{]", text, re.M):
        try:
            obj, _ = decoder.raw_decode(text, start.start())
        except ValueError:
            continue
        return obj
    raise AssertionError(f"no JSON document in the command's stdout: {text!r}")


def out_json(capsys, argv):
    """Run ``farm ARGV`` (it must exit 0) and return the JSON it printed."""
    capsys.readouterr()
    code = farm_main(argv)
    text = capsys.readouterr().out
    assert code == 0, text
    return command_json(text)


def run_id_line(text: str) -> str:
    """The run id ``farm submit`` printed first on its stdout ("" when it printed none); notices
    interleaved before it (see above) are passed over."""
    return next((line.strip() for line in text.splitlines() if re.fullmatch(r"r-[0-9a-f]{16}", line.strip())), "")
