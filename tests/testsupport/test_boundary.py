"""Test support stays out of what ships: no shipped module imports it, and it is not packaged."""
from __future__ import annotations

import ast
import fnmatch
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = ("lora_core", "storage", "jobs", "workers", "farm")


def imported_names(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names: set[str] = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


DEV_ONLY = ("testsupport", "training", "benchmarks")  # in the repository, not in the distribution


def test_no_shipped_module_imports_testsupport():
    offenders = []
    for pkg in SHIPPED:
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                path = os.path.join(dirpath, f)
                if f.endswith(".py") and any(n.split(".")[0] in DEV_ONLY for n in imported_names(path)):
                    offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, f"shipped modules importing {DEV_ONLY}: {offenders}"


def test_testsupport_is_not_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(fnmatch.fnmatch(name, pattern) for name in ("testsupport", "testsupport.sleep", "training", "training.run")
                   for pattern in include)
