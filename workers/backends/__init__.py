"""Render backends: the built-in tiny model, any local diffusers pipeline, nunchaku (when installed).

``make_backend(spec, device)`` builds the one a spec names (:mod:`.registry`); the shared
types live in :mod:`.base`.
"""
from __future__ import annotations

from .base import Backend, BackendError, BackendSpecError, BackendUnavailableError, ModelPathError, RenderRequest
from .registry import BACKENDS, BackendFactory, make_backend, register_backend, unregister_backend

__all__ = ["BACKENDS", "Backend", "BackendError", "BackendFactory", "BackendSpecError", "BackendUnavailableError",
           "ModelPathError", "RenderRequest", "make_backend", "register_backend", "unregister_backend"]
