"""RoPE scaling (position interpolation above a timestep threshold) on the real tiny transformer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from workers.backends import BackendSpecError, RenderRequest, make_backend
from workers.backends.tiny import TINY_TRANSFORMER_CONFIG
from workers.rope import RopeScaling, normalized_timestep, rope_from_spec

GRID = (1, 16, 16)  # a 256x256 image: 32x32 latents, 16x16 after 2x2 packing


@pytest.fixture(scope="module")
def transformer() -> QwenImageTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).eval()


@pytest.fixture(scope="module")
def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 256, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 7, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=g),
                img_shapes=[[GRID]], return_dict=False)


@torch.no_grad()
def run(model: torch.nn.Module, inputs: dict, t: float) -> torch.Tensor:
    return model(timestep=torch.tensor([t]), **inputs)[0]


def test_factor_one_is_bit_identical(transformer, inputs):
    plain = {t: run(transformer, inputs, t) for t in (0.95, 0.3)}
    rope = RopeScaling(factor=1.0, timestep_threshold=0.0).attach(transformer)
    try:
        for t, expected in plain.items():
            out = run(transformer, inputs, t)
            assert rope.active  # the scaled tables are really in use ...
            assert torch.equal(out, expected)  # ... and they equal the originals bit for bit
    finally:
        rope.detach()


def test_factor_two_changes_only_steps_above_the_threshold(transformer, inputs):
    high, low = 0.9, 0.4
    plain_high, plain_low = run(transformer, inputs, high), run(transformer, inputs, low)
    rope = RopeScaling(factor=2.0, timestep_threshold=0.6).attach(transformer)
    try:
        scaled_high = run(transformer, inputs, high)
        assert rope.active
        scaled_low = run(transformer, inputs, low)
        assert not rope.active
    finally:
        rope.detach()
    assert not torch.allclose(scaled_high, plain_high, atol=1e-4)
    assert torch.equal(scaled_low, plain_low)
    # detached: back to the original embedder
    assert "forward" not in vars(transformer.pos_embed)
    assert torch.equal(run(transformer, inputs, high), plain_high)


def test_scaled_positions_are_positions_over_factor(transformer):
    rope = RopeScaling(factor=2.0).attach(transformer)
    try:
        rope.active = True
        vid, txt = transformer.pos_embed(GRID, max_txt_seq_len=4, device=torch.device("cpu"))
        rope.active = False
        vid_plain, txt_plain = transformer.pos_embed(GRID, max_txt_seq_len=4, device=torch.device("cpu"))
    finally:
        rope.detach()
    # Rotation angles of the width axis (last 6 complex pairs) halve: angle(scaled)^2 == angle(plain)
    # up to wrap-around, i.e. scaled * scaled == plain.
    assert torch.allclose(vid[:, -6:] ** 2, vid_plain[:, -6:], atol=1e-5)
    assert torch.allclose(txt ** 2, txt_plain, atol=1e-5)


def test_through_the_pipeline():
    req = [RenderRequest("a cat in the rain", seed=1, steps=4)]
    plain = make_backend({"backend": "tiny"}, device="cpu").render(req)[0]
    same = make_backend({"backend": "tiny", "rope": {"factor": 1.0}}, device="cpu")
    assert same.rope is None  # factor 1 is off: nothing is wrapped
    scaled = make_backend({"backend": "tiny", "rope": {"factor": 2.0, "timestep_threshold": 0.5}}, device="cpu")
    out = scaled.render(req)[0]
    assert not np.array_equal(np.asarray(out), np.asarray(plain))
    scaled.set_rope_scaling(None)
    assert np.array_equal(np.asarray(scaled.render(req)[0]), np.asarray(plain))


def test_settings_and_timestep_units():
    assert normalized_timestep(0.7) == 0.7 and normalized_timestep(700.0) == 0.7
    assert rope_from_spec(None) is None and rope_from_spec({"factor": 1}) is None
    with pytest.raises(ValueError, match="factor"):
        RopeScaling(factor=0)
    with pytest.raises(ValueError, match="timestep_threshold"):
        RopeScaling(factor=2, timestep_threshold=5)
    with pytest.raises(BackendSpecError, match="unknown keys"):
        make_backend({"backend": "tiny", "rope": {"factr": 2}})
