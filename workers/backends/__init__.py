"""Render backends: the built-in tiny model, any local diffusers pipeline, nunchaku (when installed)."""
from __future__ import annotations

from .base import (BACKENDS, Backend, BackendError, BackendSpecError, BackendUnavailableError, ModelPathError,
                   RenderRequest, make_backend)

__all__ = ["BACKENDS", "Backend", "BackendError", "BackendSpecError", "BackendUnavailableError", "ModelPathError",
           "RenderRequest", "make_backend"]
