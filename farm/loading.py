"""A manifest from a path for a command: loaded and validated, or its problems printed."""
from __future__ import annotations

import sys


def load_or_report(path: str):
    """The ``Manifest`` at ``path``, or None after printing every problem to stderr (exit 2 follows)."""
    from jobs.manifest import ManifestError, load_manifest

    from .submit import storage_options_from_env

    try:
        # $LORA_FARM_STORAGE_OPTIONS: how `farm submit` hands secrets to the job (never in its package)
        return load_manifest(path, storage_options_from_env())
    except ManifestError as e:
        print(f"{path}: {len(e.problems)} problem(s):", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
