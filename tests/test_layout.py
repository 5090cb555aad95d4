"""The layout promises of the README's "Architecture": what each package may import, module size,
and no import cycle among library modules. They fail the moment a change breaks one."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("lora_core", "storage", "jobs", "workers", "farm")
MAX_LINES = 400


def library_modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the shipped packages."""
    out = {}
    for pkg in LIBRARY:
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """Library modules that ``name`` imports, at module level or inside a function: a lazy import
    still ties the two modules together."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_among_library_modules():
    modules = library_modules()
    graph = {}
    for name, path in modules.items():
        # a package's __init__ re-exporting its own submodules is not a cycle of logic
        graph[name] = {m for m in imports_of(name, path, modules) if not name.startswith(m + ".")}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# docs/INTERFACES.md "Who may import whom": the importing package (longest prefix wins) -> what of
# ours it may import besides itself (a module, or a package and everything under it)
ALLOWED_IMPORTS = {
    "storage": (),
    "lora_core": ("storage",),
    "jobs": ("storage", "lora_core.modes"),
    "workers": ("lora_core", "storage", "jobs"),
    "farm": ("lora_core", "storage", "jobs", "workers"),
    "farm.scheduler": (),
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_imports(graph: dict[str, set[str]], rules: dict[str, tuple[str, ...]]) -> list[str]:
    """``importer -> imported`` for each edge of ``graph`` that ``rules`` do not allow; a module
    is ruled by the longest rule prefix it falls under, and may always import its own part."""
    bad = []
    for name in sorted(graph):
        owners = [r for r in rules if _under(name, r)]
        if not owners:
            continue
        own = max(owners, key=len)
        for m in sorted(graph[name]):
            if not (_under(m, own) or any(_under(m, ok) for ok in rules[own])):
                bad.append(f"{name} -> {m}")
    return bad


def test_each_package_imports_only_what_interfaces_allows():
    modules = library_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    bad = forbidden_imports(graph, ALLOWED_IMPORTS)
    assert not bad, f"imports docs/INTERFACES.md does not allow: {bad}"


def test_the_import_rules_catch_a_forbidden_import():
    graph = {
        "storage.fetch": {"storage.errors", "lora_core.errors"},
        "jobs.options": {"lora_core.modes", "storage.output"},
        "jobs.validate": {"lora_core.api"},
        "farm.dispatcher": {"farm.scheduler.types", "workers.worker"},
        "farm.scheduler.sim": {"farm.scheduler.affinity", "farm.books"},
        "other.mod": {"farm.cli"},
    }
    assert forbidden_imports(graph, ALLOWED_IMPORTS) == [
        "farm.scheduler.sim -> farm.books", "jobs.validate -> lora_core.api", "storage.fetch -> lora_core.errors"]


def test_no_library_module_over_the_size_limit():
    long = {name: n for name, path in library_modules().items()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("module, forbidden", [
    ("lora_core", ("ray", "fsspec")),
    ("jobs", ("torch", "ray")),
    ("storage", ("torch", "ray")),
    ("farm.scheduler", ("torch", "ray", "fsspec")),
])
def test_what_a_package_import_pulls_in(module, forbidden):
    code = (f"import sys, {module}; "
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import {module} imported {out.stdout.strip()}"
