"""Render backends on the real tiny Qwen-Image pipeline (CPU, random weights, nothing downloaded)."""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import torch

from workers.backends import (Backend, BackendSpecError, BackendUnavailableError, ModelPathError, RenderRequest,
                              make_backend)
from workers.backends.nunchaku_backend import nunchaku_available
from workers.backends.tiny import TINY_TRANSFORMER_CONFIG, save_tiny_pipeline, template_prefix_tokens
from workers.worker import png_bytes as png  # the farm's own encoder: the bytes it writes

CAT = RenderRequest("a cat in the rain", seed=1)



def digest(image) -> str:
    return hashlib.sha256(png(image)).hexdigest()


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def tiny():
    return make_backend({"backend": "tiny"}, device="cpu")


@pytest.fixture(scope="module")
def random0():
    """The random-weight build, seed 0 (what `args: {seed: 0}` and save_tiny_pipeline() give)."""
    return make_backend({"backend": "tiny", "weights": "random"}, device="cpu")


class CallCounter:
    """Counts transformer calls through a forward pre-hook (the model itself is untouched)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


# ---- the tiny backend ---------------------------------------------------------------------
def test_tiny_is_a_backend_with_the_published_config(tiny):
    assert isinstance(tiny, Backend)
    assert tiny.name == "tiny" and tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    config = tiny.transformer.config
    for key, value in TINY_TRANSFORMER_CONFIG.items():
        got = config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    assert tiny.transformer.inner_dim == 128
    assert sum(TINY_TRANSFORMER_CONFIG["axes_dims_rope"]) == TINY_TRANSFORMER_CONFIG["attention_head_dim"]


def test_lora_target_names_are_diffusers_names(tiny):
    linears = {n: m for n, m in tiny.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                 "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.img_mlp.net.0.proj",
                 "transformer_blocks.0.img_mod.1", "img_in", "txt_in", "proj_out"):
        assert name in linears, name
    assert linears["transformer_blocks.0.attn.to_q"].weight.shape == (128, 128)
    assert linears["txt_in"].in_features == TINY_TRANSFORMER_CONFIG["joint_attention_dim"]


def test_prompt_template_prefix_matches_the_pipeline_drop_index(tiny):
    # QwenImagePipeline drops 34 tokens (the system prompt); ours must be exactly those 34.
    assert template_prefix_tokens(tiny.pipe) == tiny.pipe.prompt_template_encode_start_idx == 34


def test_same_request_gives_the_same_bytes(tiny):
    first = tiny.render([CAT])[0]
    assert first.size == (256, 256) and first.mode == "RGB"
    assert digest(tiny.render([CAT])[0]) == digest(first)
    fresh = make_backend({"backend": "tiny"}, device="cpu")  # a second build: same weights
    assert digest(fresh.render([CAT])[0]) == digest(first)
    # ... and it is an image of something, not a constant or a saturated field
    assert 10 < pixels(first).std() and (pixels(first) == 255).mean() < 0.5


def test_seed_prompt_and_size_matter(tiny):
    base = digest(tiny.render([CAT])[0])
    assert digest(tiny.render([RenderRequest(CAT.prompt, seed=2)])[0]) != base
    assert digest(tiny.render([RenderRequest("a red fox at sunset", seed=1)])[0]) != base
    wide = tiny.render([RenderRequest(CAT.prompt, seed=1, width=192, height=128, steps=2)])[0]
    assert wide.size == (192, 128)


def test_batch_results_equal_renders_alone_and_keep_order(tiny):
    reqs = [CAT, RenderRequest("a red fox on a hill at sunset", seed=7, steps=3),
            RenderRequest("a photo of a dog", seed=3)]
    together = tiny.render(reqs)
    alone = [tiny.render([r])[0] for r in reqs]
    assert [digest(i) for i in together] == [digest(i) for i in alone]


def test_batched_pipeline_calls_are_close_but_not_bitwise(tiny):
    # One pipeline call for several requests is faster, but CPU kernels pick other blockings
    # for other batch sizes: images differ in the last bit here and there. That is why the
    # tiny backend renders one request per call unless the spec says {"batch": true}.
    batched = make_backend({"backend": "tiny", "batch": True}, device="cpu")
    reqs = [CAT, RenderRequest("a photo of a dog", seed=3)]
    assert batched._plan(reqs) == [[0, 1]]
    together = batched.render(reqs)
    for img, req in zip(together, reqs):
        assert np.abs(pixels(img) - pixels(tiny.render([req])[0])).max() <= 3


def test_negative_prompt_with_guidance_is_true_cfg(tiny):
    steps = 3
    plain = RenderRequest(CAT.prompt, seed=1, steps=steps, guidance=4.0)
    negative = RenderRequest(CAT.prompt, negative_prompt="blurry, dark", seed=1, steps=steps, guidance=4.0)
    no_scale = RenderRequest(CAT.prompt, negative_prompt="blurry, dark", seed=1, steps=steps, guidance=1.0)
    with CallCounter(tiny.transformer) as count:
        img_plain = tiny.render([plain])[0]
    assert count.calls == steps  # empty negative prompt: no CFG
    with CallCounter(tiny.transformer) as count:
        img_neg = tiny.render([negative])[0]
    assert count.calls == 2 * steps  # cond + uncond per step
    assert digest(img_neg) != digest(img_plain)
    with CallCounter(tiny.transformer) as count:
        img_one = tiny.render([no_scale])[0]
    assert count.calls == steps and digest(img_one) == digest(img_plain)  # guidance 1: CFG is a no-op


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_backend({"backend": "tiny"}, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_render_time_256_4_steps(tiny):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny.render([CAT])  # warm-up
        t0 = time.perf_counter()
        tiny.render([CAT])
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    print(f"tiny 256x256, 4 steps, 1 thread: {seconds:.3f} s")
    assert seconds < 5.0  # ~0.5 s on a 2020s CPU core; loose so a busy CI box does not flake


def test_sizes_the_pipeline_would_round_are_refused(tiny):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.render([RenderRequest(CAT.prompt, width=250, height=256)])
    with pytest.raises(ValueError, match="steps"):
        tiny.render([RenderRequest(CAT.prompt, steps=0)])


def test_to_device_and_reset(tiny):
    assert tiny.to("cpu") is tiny and tiny.device == torch.device("cpu")
    tiny.reset_step_cache()  # no cache attached: a no-op, not an error


# ---- specs and errors ---------------------------------------------------------------------
def test_unknown_backend_is_named():
    with pytest.raises(BackendSpecError, match="'onnx'"):
        make_backend({"backend": "onnx"})


def test_every_spec_problem_is_reported_at_once():
    with pytest.raises(BackendSpecError) as err:
        make_backend({"backend": "diffusers", "pth": "/x", "steps": 4})
    text = str(err.value)
    assert "pth" in text and "steps" in text and "path: required" in text
    assert len(err.value.problems) == 3


def test_bad_dtype_and_bad_option_types():
    with pytest.raises(BackendSpecError, match="dtype"):
        make_backend({"backend": "tiny", "dtype": "float8"})
    with pytest.raises(BackendSpecError, match="step_cache"):
        make_backend({"backend": "tiny", "step_cache": 0.5})
    with pytest.raises(BackendSpecError, match="mag_ratios"):
        make_backend({"backend": "tiny", "step_cache": {"threshold": 0.1}})


def test_manifest_style_spec_with_args_and_auto_dtype(tiny, random0):
    # jobs.validate hands over {backend, path?, dtype?, args?}; args are backend options.
    b = make_backend({"backend": "tiny", "dtype": "auto",
                      "args": {"seed": 0, "step_cache": {"calibrate": True, "verbose": False}}}, device="cpu")
    assert b.dtype == torch.float32 and b.step_cache is not None and b.step_cache.calibrate
    assert digest(b.render([CAT])[0]) == digest(random0.render([CAT])[0])  # calibration never skips
    assert digest(random0.render([CAT])[0]) != digest(tiny.render([CAT])[0])  # a seed: random, not the trained
    other = make_backend({"backend": "tiny", "args": {"seed": 1}}, device="cpu")
    assert digest(other.render([CAT])[0]) != digest(random0.render([CAT])[0])  # other weights
    with pytest.raises(BackendSpecError, match="args.dtype"):
        make_backend({"backend": "tiny", "dtype": "float32", "args": {"dtype": "bfloat16"}})
    with pytest.raises(BackendSpecError, match="colour"):
        make_backend({"backend": "tiny", "args": {"colour": "red"}})


def test_diffusers_missing_path(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        make_backend({"backend": "diffusers", "path": str(tmp_path / "nope")})
    with pytest.raises(ModelPathError, match="model_index.json"):
        make_backend({"backend": "diffusers", "path": str(tmp_path)})
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(ModelPathError, match="could not load"):
        make_backend({"backend": "diffusers", "path": str(tmp_path)})


def test_diffusers_backend_loads_the_saved_tiny_pipeline(tmp_path, random0):
    save_tiny_pipeline(tmp_path / "tiny-qwen")
    loaded = make_backend({"backend": "diffusers", "path": str(tmp_path / "tiny-qwen")}, device="cpu")
    assert loaded.name == "diffusers" and loaded.dtype == torch.float32
    assert type(loaded.transformer).__name__ == "QwenImageTransformer2DModel"
    names = [n for n, _ in loaded.transformer.named_modules()]
    assert names == [n for n, _ in random0.transformer.named_modules()]
    assert digest(loaded.render([CAT])[0]) == digest(random0.render([CAT])[0])


@pytest.mark.skipif(nunchaku_available(), reason="nunchaku is installed here")
def test_nunchaku_absent_says_how_to_install():
    with pytest.raises(BackendUnavailableError) as err:
        make_backend({"backend": "nunchaku", "path": "/models/svdq.safetensors", "pipeline": "/models/qwen"})
    text = str(err.value)
    assert "not installed" in text and "github.com/nunchaku-tech/nunchaku/releases" in text
    assert "not on PyPI" in text
    assert isinstance(err.value, ImportError)
