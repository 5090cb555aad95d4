"""The sleep backend's optional load time and realistic (hard to compress) images; the
defaults stay as they were (the other sleep tests pin those)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from testsupport import sleep as S
from workers.backends import make_backend
from workers.backends.base import BackendSpecError, RenderRequest
from workers.worker import png_bytes


def req(seed: int) -> RenderRequest:
    return RenderRequest(prompt="p", seed=seed, steps=2, width=1328, height=1328)


def test_load_s_sleeps_once_when_the_backend_is_built(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(time, "sleep", calls.append)
    b = make_backend({"backend": "sleep", "load_s": 30}, device="cpu")
    assert calls == [30.0] and b.load_s == 30.0
    b.render([req(0)])  # render_s 0: a render adds no sleep
    assert calls == [30.0]
    make_backend({"backend": "sleep"}, device="cpu")
    assert calls == [30.0], "no load_s: no sleep"


def test_bad_load_s_and_realistic_are_listed():
    with pytest.raises(BackendSpecError) as e:
        make_backend({"backend": "sleep", "load_s": -1, "realistic": "yes"}, device="cpu")
    assert len(e.value.problems) == 2 and "load_s" in str(e.value) and "realistic" in str(e.value)


def test_realistic_images_are_full_size_deterministic_and_hard_to_compress():
    b = make_backend({"backend": "sleep", "image_size": 1328, "realistic": True}, device="cpu")
    one, two, again = b.render([req(1), req(2), req(1)])
    assert one.size == (1328, 1328) and one.mode == "RGB"
    assert one.tobytes() == again.tobytes() and one.tobytes() != two.tobytes()
    png = png_bytes(one)
    raw = 1328 * 1328 * 3
    assert len(png) > raw // 3, len(png)  # a flat colour compresses to a few KB; real renders to MBs
    flat = png_bytes(make_backend({"backend": "sleep", "image_size": 1328}, device="cpu").render([req(1)])[0])
    assert len(flat) < raw // 100
    # a smooth gradient under the noise: the mean colour changes across the image
    grey = np.asarray(one.convert("L"), dtype=np.float64)
    assert abs(grey[:, :64].mean() - grey[:, -64:].mean()) > 5


def test_realistic_render_sleeps_only_what_is_left_of_r(monkeypatch):
    calls: list[float] = []
    b = S.SleepBackend(render_s=0.5, image_size=64, realistic=True)
    monkeypatch.setattr(time, "sleep", calls.append)
    b.render([req(0), req(1)])
    assert len(calls) == 1 and 0 < calls[0] <= 1.0 and b.rendered == 2


def test_defaults_are_unchanged():
    b = S.SleepBackend()
    assert (b.load_s, b.realistic, b.image_size) == (0.0, False, 8)
    img = b.render([req(3)])[0]
    assert img.size == (8, 8) and (np.asarray(img) == np.array(S.seed_colour(3), dtype=np.uint8)).all()
