"""The one registry of render backends: a name -> a factory that builds one from a spec.

The built-in backends (the names ``jobs.options.BACKENDS`` lets a manifest choose) are
listed by module path and imported on first use, so importing this module imports
neither diffusers nor a backend a CPU-only install never uses. Tests and benchmarks add
their own fakes with :func:`register_backend` (``testsupport.sleep`` registers
``"sleep"``); a manifest can still name only the built-ins, because ``jobs.validate``
checks the name against ``BACKENDS`` and nothing here imports a module a spec names.

A registration lives in one process. A Ray actor builds its backend in its own process,
so a driver that wants a registered fake there passes the factory itself
(``RenderWorker(backend_factory=...)``): it pickles by reference and the actor imports
its module when it unpickles it.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import torch

from jobs.options import BACKENDS

from .base import Backend, BackendSpecError, flatten_args

#: ``factory(spec, device)``: ``spec`` is flat (``args:`` already merged in), ``device`` as given.
BackendFactory = Callable[[Mapping[str, Any], "str | torch.device | None"], Backend]

# name -> "module:class" whose ``from_spec`` builds it; imported on first use (see the docstring)
_BUILTIN: dict[str, str] = {
    "tiny": "workers.backends.tiny:TinyBackend",
    "diffusers": "workers.backends.diffusers_backend:DiffusersBackend",
    "nunchaku": "workers.backends.nunchaku_backend:NunchakuBackend",
}
assert tuple(_BUILTIN) == BACKENDS, "jobs.options.BACKENDS and the built-in backends must name the same ones"

_registered: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``make_backend({"backend": name, ...})`` call ``factory`` in this process.

    A built-in name cannot be taken (a fake must not silently stand in for ``tiny``);
    registering another factory under a taken name needs ``replace=True``. Registering the
    same factory again is a no-op, so a module may register itself on import.
    """
    if name in _BUILTIN:
        raise ValueError(f"backend {name!r} is built in and cannot be registered")
    if _registered.get(name, factory) is not factory and not replace:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True to replace it)")
    _registered[name] = factory


def unregister_backend(name: str) -> None:
    """Forget a registered backend (no-op when absent); built-ins stay."""
    _registered.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The built-in names, then those registered in this process."""
    return (*BACKENDS, *(n for n in _registered if n not in _BUILTIN))


def backend_factory(name: str) -> BackendFactory:
    """The factory for ``name``; a BackendSpecError naming the choices if there is none."""
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN:
        raise BackendSpecError([f"backend: unknown {name!r} (one of {list(backend_names())})"])
    module, _, cls = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), cls).from_spec


def make_backend(spec: Mapping[str, Any] | None, device: str | torch.device | None = None, *,
                 factory: BackendFactory | None = None) -> Backend:
    """Build the backend a spec names. ``spec["backend"]`` defaults to ``"tiny"``.

    ``factory``, when given, builds it instead of the one registered under the spec's name
    (how a driver hands a Ray actor a backend registered only in the driver).
    """
    spec = flatten_args(spec or {"backend": "tiny"})
    build = factory or backend_factory(spec.get("backend", "tiny"))
    return build(spec, device)


__all__ = ["BackendFactory", "backend_factory", "backend_names", "make_backend", "register_backend",
           "unregister_backend"]
