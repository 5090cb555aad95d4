"""The backend registry: built-ins by name and imported on first use, fakes registered by tests."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers.backends import BackendSpecError, make_backend, register_backend, unregister_backend
from workers.backends.registry import backend_factory, backend_names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Fake:
    """Records the spec and device it was built with; the registry never looks inside."""

    def __init__(self, spec, device):
        self.spec, self.device = dict(spec), device


def test_builtin_names_are_the_manifest_choices():
    from jobs.options import BACKENDS

    assert backend_names()[: len(BACKENDS)] == BACKENDS
    assert all(callable(backend_factory(n)) for n in ("tiny", "diffusers"))  # nunchaku may not be installed


def test_importing_the_registry_imports_no_backend():
    code = ("import sys, workers.backends; "
            "print(','.join(m for m in ('diffusers', 'workers.backends.tiny', 'workers.backends.diffusers_backend') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_a_registered_fake_is_built_with_the_flat_spec():
    register_backend("fake", Fake)
    try:
        assert "fake" in backend_names()
        b = make_backend({"backend": "fake", "args": {"speed": 2}}, device="cpu")
        assert isinstance(b, Fake) and b.spec == {"backend": "fake", "speed": 2} and b.device == "cpu"
        register_backend("fake", Fake)  # the same factory again: a no-op
        with pytest.raises(ValueError, match="already registered"):
            register_backend("fake", lambda spec, device: None)
        register_backend("fake", lambda spec, device: "other", replace=True)
        assert make_backend({"backend": "fake"}) == "other"
    finally:
        unregister_backend("fake")
    with pytest.raises(BackendSpecError, match="'fake'"):
        make_backend({"backend": "fake"})


def test_a_builtin_name_cannot_be_taken():
    with pytest.raises(ValueError, match="built in"):
        register_backend("tiny", Fake)


def test_an_injected_factory_wins_over_the_name():
    b = make_backend({"backend": "not-registered-here", "x": 1}, "cpu", factory=Fake)
    assert isinstance(b, Fake) and b.spec == {"backend": "not-registered-here", "x": 1}


def test_a_manifest_cannot_name_a_registered_backend():
    from jobs import ManifestError, validate_manifest

    register_backend("fake", Fake)
    try:
        with pytest.raises(ManifestError, match="fake"):
            validate_manifest({"model": {"backend": "fake"}, "jobs": [{"prompt": "p"}]})
    finally:
        unregister_backend("fake")
