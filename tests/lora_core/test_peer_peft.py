"""Our merge against the peer: diffusers + PEFT (load_lora_adapter + fuse_lora) on the same files."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_core
from testsupport import lora as T

from .conftest import assert_same, snapshot

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "img_mlp.net.2", "img_mod.1")


@pytest.mark.parametrize("scheme", ["peft", "kohya"])
def test_merge_matches_diffusers_peft(qwen, tmp_path, scheme):
    layers = T.random_layers(T.linear_shapes(qwen, TARGETS), rank=4, seed=21, alpha=4.0)
    if scheme == "peft":
        sd = T.peft_state_dict(layers, prefix="transformer.", with_alpha=False)
    else:
        sd = T.kohya_state_dict(layers, prefix="diffusion_model.", underscored=False)
    path = T.write_safetensors(tmp_path / "l.safetensors", sd)
    peer = copy.deepcopy(qwen)
    peer_sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    if scheme == "kohya":
        pytest.importorskip("peft")
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

        peer_sd = {k[len("transformer."):]: v for k, v in _convert_non_diffusers_qwen_lora_to_diffusers(dict(sd)).items()}
    peer.load_lora_adapter(peer_sd, adapter_name="a", prefix=None)
    peer.fuse_lora(lora_scale=0.75, adapter_names=["a"])
    peer.unload_lora()
    snap = snapshot(qwen)
    h = lora_core.apply(qwen, [(path, 0.75)])
    ours, theirs = qwen.state_dict(), peer.state_dict()
    touched = 0
    for k, v in ours.items():
        assert torch.allclose(v, theirs[k], atol=1e-6, rtol=1e-5), k
        touched += not torch.equal(v, snap[k])
    assert touched == len(layers)
    h.restore()
    assert_same(qwen, snap)
