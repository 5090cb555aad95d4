"""Every kind of bad LoRA file: a specific error naming file and key; the model untouched."""
from __future__ import annotations

import os

import pytest
import torch

import lora_core
from lora_core import errors as E
from testsupport import lora as T

from .conftest import assert_same, snapshot


@pytest.fixture
def good(qwen, tmp_path):
    layers = T.random_layers(T.linear_shapes(qwen, ("attn.to_q", "attn.to_k", "img_mlp")), rank=4, seed=1)
    return layers, T.write_safetensors(tmp_path / "good.safetensors", T.peft_state_dict(layers))


def check_untouched(qwen, path_or_items, err, match=None):
    snap = snapshot(qwen)
    items = path_or_items if isinstance(path_or_items, list) else [(path_or_items, 1.0)]
    with pytest.raises(err, match=match) as info:
        lora_core.apply(qwen, items)
    assert_same(qwen, snap)
    return info.value


def test_truncated_file(qwen, good, tmp_path):
    _, path = good
    data = open(path, "rb").read()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    e = check_untouched(qwen, str(bad), E.CorruptFileError, "truncated")
    assert "trunc.safetensors" in str(e) and e.key is not None


def test_not_safetensors_bytes(qwen, tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"hello, this is not a tensor file at all" * 10)
    e = check_untouched(qwen, str(bad), E.CorruptFileError)
    assert "junk.safetensors" in str(e)


def test_empty_and_header_garbage(qwen, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    check_untouched(qwen, str(tmp_path / "empty.safetensors"), E.CorruptFileError)
    raw = (8).to_bytes(8, "little") + b"{notjson"
    (tmp_path / "hdr.safetensors").write_bytes(raw)
    check_untouched(qwen, str(tmp_path / "hdr.safetensors"), E.CorruptFileError, "JSON")


def test_pickle_refused_unless_opted_in(qwen, good, tmp_path):
    layers, _ = good
    pt = tmp_path / "lora.pt"
    torch.save(T.peft_state_dict(layers), pt)
    check_untouched(qwen, str(pt), E.UnsafeFormatError, "pickle")
    snap = snapshot(qwen)
    h = lora_core.apply(qwen, [(str(pt), 1.0)], allow_pickle=True)  # weights_only=True inside
    assert len(h.modules) == len(layers)
    h.restore()
    assert_same(qwen, snap)


def test_pickle_with_code_is_refused_even_when_opted_in(qwen, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    pt = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, pt)
    with pytest.raises(E.CorruptFileError):
        lora_core.load_adapter(str(pt), allow_pickle=True)


def test_shape_that_does_not_fit(qwen, tmp_path):
    a, b = torch.randn(4, 99), torch.randn(32, 4)
    sd = T.peft_state_dict({"transformer_blocks.0.attn.to_q": (a, b, 4.0)})
    e = check_untouched(qwen, T.write_safetensors(tmp_path / "s.safetensors", sd), E.ShapeMismatchError, "99")
    assert e.key == "transformer_blocks.0.attn.to_q"


def test_rank_mismatch_inside_file(qwen, tmp_path):
    sd = T.peft_state_dict({"transformer_blocks.0.attn.to_q": (torch.randn(4, 32), torch.randn(32, 3), 4.0)})
    check_untouched(qwen, T.write_safetensors(tmp_path / "r.safetensors", sd), E.ShapeMismatchError, "rank")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_inf_values(qwen, good, tmp_path, value):
    layers, _ = good
    name = sorted(layers)[-1]
    a, b, alpha = layers[name]
    b = b.clone()
    b[0, 0] = value
    sd = T.peft_state_dict({**layers, name: (a, b, alpha)})
    e = check_untouched(qwen, T.write_safetensors(tmp_path / "n.safetensors", sd), E.NonFiniteError)
    assert name in e.key


def test_merge_overflow_detected_and_rolled_back(qwen, good, tmp_path):
    """Finite factors whose product overflows bf16/fp32: caught before commit, earlier modules rolled back."""
    layers, _ = good
    name = sorted(layers)[-1]  # applied after the others: exercises rollback
    a, b, alpha = layers[name]
    sd = T.peft_state_dict({**layers, name: (a * 0 + 1e30, b * 0 + 1e30, alpha)})
    check_untouched(qwen, T.write_safetensors(tmp_path / "o.safetensors", sd), E.NonFiniteError)


def test_unknown_keys_listed(qwen, good, tmp_path):
    layers, _ = good
    sd = T.peft_state_dict(layers)
    sd["transformer.transformer_blocks.0.attn.to_q.lora_A.bias"] = torch.zeros(4)
    sd["something_else.weight"] = torch.zeros(2)
    e = check_untouched(qwen, T.write_safetensors(tmp_path / "u.safetensors", sd), E.UnknownKeysError)
    assert set(e.keys) == {"transformer.transformer_blocks.0.attn.to_q.lora_A.bias", "something_else.weight"}
    assert "u.safetensors" in str(e)


def test_targets_missing_from_model_listed(qwen, tmp_path):
    sd = T.peft_state_dict({"transformer_blocks.7.attn.to_q": (torch.randn(2, 32), torch.randn(32, 2), 2.0),
                            "text_model.encoder.fc1": (torch.randn(2, 8), torch.randn(8, 2), 2.0)})
    e = check_untouched(qwen, T.write_safetensors(tmp_path / "m.safetensors", sd), E.TargetNotFoundError)
    assert "transformer_blocks.7.attn.to_q" in str(e) and "text_model.encoder.fc1" in str(e)


@pytest.mark.parametrize("key,kind", [
    ("lora_unet_blocks_0.lokr_w1", "LoKr"),
    ("lora_unet_blocks_0.hada_w1_a", "LoHa"),
    ("base_model.model.blocks.0.ia3_l.weight", "IA3"),
    ("transformer.blocks.0.lora_magnitude_vector", "DoRA"),
    ("lora_unet_blocks_0.dora_scale", "DoRA"),  # kohya / LyCORIS DoRA beside lora_down/lora_up
    ("lora_unet_blocks_0.lora_mid.weight", "LoCon-Tucker"),  # LyCORIS use_tucker
])
def test_unsupported_formats_named(qwen, tmp_path, key, kind):
    sd = {key: torch.zeros(2, 2), "transformer.x.lora_A.weight": torch.zeros(1, 2), "transformer.x.lora_B.weight": torch.zeros(2, 1)}
    e = check_untouched(qwen, T.write_safetensors(tmp_path / "x.safetensors", sd), E.UnsupportedFormatError, kind)
    assert "x.safetensors" in str(e)


def test_aitoolkit_fullrank_lone_full_size_lora_a_is_refused_by_key(qwen, tmp_path):
    """ai-toolkit ``network.type: fullrank`` (README table): the whole delta stored as one
    full-size ``lora_A`` (out x in) with no ``lora_B``; not a low-rank pair, refused naming
    the key, beside a good pair that is not applied either."""
    w = qwen.get_submodule("transformer_blocks.0.attn.to_k").weight
    key = "diffusion_model.transformer_blocks.0.attn.to_k.lora_A.weight"
    sd = {key: torch.zeros(w.shape, dtype=torch.float16),
          "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32, dtype=torch.float16),
          "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4, dtype=torch.float16)}
    e = check_untouched(qwen, T.write_safetensors(tmp_path / "fullrank.safetensors", sd), E.UnknownKeysError, "partner")
    assert e.keys == [key] and "fullrank.safetensors" in str(e)


def test_lonely_down_without_up(qwen, tmp_path):
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)}
    check_untouched(qwen, T.write_safetensors(tmp_path / "l.safetensors", sd), E.UnknownKeysError, "partner")


def test_failure_in_second_lora_leaves_model_as_before(qwen, good, tmp_path):
    _, path = good
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    check_untouched(qwen, [(path, 1.0), (str(bad), 1.0)], E.CorruptFileError)


def test_error_hierarchy():
    for cls in (E.CorruptFileError, E.UnsafeFormatError, E.UnsupportedFormatError, E.UnknownKeysError,
                E.ShapeMismatchError, E.NonFiniteError, E.TargetNotFoundError, E.ChecksumMismatch):
        assert issubclass(cls, E.LoraError)
    assert E.FetchError.transient and not E.PermanentFetchError.transient and not E.ChecksumMismatch.transient


def test_overflow_only_in_the_cast_to_fp16_is_caught(qwen, tmp_path):
    """1e5 is finite in fp32 but Inf in fp16: the check runs on what would be stored."""
    qwen.to(torch.float16)
    name = "transformer_blocks.0.attn.to_q"
    a = torch.zeros(1, 32)
    a[0, 0] = 1.0
    b = torch.zeros(32, 1)
    b[0, 0] = 1e5
    sd = T.peft_state_dict({name: (a, b, 1.0)})
    check_untouched(qwen, T.write_safetensors(tmp_path / "f16.safetensors", sd), E.NonFiniteError)


def test_all_finite_agrees_with_isfinite():
    from lora_core.targets.dense import all_finite

    t = torch.randn(64, 64)
    assert all_finite(t)
    assert all_finite(torch.full((8,), 3e38)), "a sum that overflows from finite values is still finite"
    assert all_finite(torch.full((8,), 3e38).bfloat16())
    assert all_finite(torch.full((8,), 6e4).half()), "fp16 sums overflow at 65504"
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[3, 7] = bad
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            assert not all_finite(u.to(dtype)), (bad, dtype)
    both = t.clone()
    both[0, 0], both[1, 1] = float("inf"), float("-inf")
    assert not all_finite(both) and not all_finite(both.bfloat16())
