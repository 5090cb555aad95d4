"""ai-toolkit's own output, full-weight parts included, as its trainer writes it
(:mod:`testsupport.aitoolkit`: the facts and where they are in its code).

A network with ``all_layers`` (norms become full-weight modules) and ``full_if_contains``
(a Linear trained whole, weight and bias) saves PEFT ``lora_A``/``lora_B`` pairs without
alpha (scale 1) beside ``.diff``/``.diff_b``, all fp16, under ``diffusion_model.`` (Qwen-Image,
Z-Image) or ``transformer.`` (Flux). What the tool means, on a bf16 model at strength m:
a full-weight module's weight and bias are ``cast(fp32(W) + m * fp32(diff))`` (its merge_in),
so they must come out bit-identical, in merge and in low-rank mode (diffs are merged there
too: ``lowrank+merge``); a LoRA'd weight is W + m * B @ A, checked against fp64.
diffusers + PEFT is the peer where its loader takes the file: Qwen-Image and Z-Image files
with diffs it refuses (ValueError, keys left over), so the peer there reads ai-toolkit's
ordinary (LoRA-only) output; Flux files it loads, dropping the diffs, so it is the peer for
every parameter no diff touches.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora_core
from lora_core.api import mode_label
from lora_core.inspection import header_adapter, summary
from testsupport import aitoolkit as AT

from .conftest import assert_same, snapshot

S = 0.8
# a representative network config per family: which Linear is trained whole
FULL_IF = {"qwen_image": ["img_mod"], "zimage": ["adaLN_modulation"], "flux": ["norm1.linear"]}


@pytest.fixture(scope="module")
def tiny_qwen_fp32():
    from workers.backends.tiny import build_tiny_pipeline

    return build_tiny_pipeline(0).transformer  # the tiny backend's `weights: random`


def _model(family: str, tiny_qwen_fp32) -> nn.Module:
    if family == "qwen_image":
        return copy.deepcopy(tiny_qwen_fp32)
    torch.manual_seed(0)
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True).eval()
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                    axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]).eval()


@pytest.fixture(params=["qwen_image", "zimage", "flux"])
def family(request):
    return request.param


@pytest.fixture
def model(family, tiny_qwen_fp32):
    return _model(family, tiny_qwen_fp32).to(torch.bfloat16)


def _write(tmp_path, model, family, full=True, **more):
    sel = dict(all_layers=True, full_if_contains=FULL_IF[family]) if full else {}
    return AT.write_network(tmp_path, model, family, job="my_lora_v1", trigger_word="ohwx", rank=4, seed=7,
                            lora_scale=0.3, **sel, **more)


def _split(sd: dict, family: str):
    """{module: (A, B)} and {param name: diff} from the saved keys, by the tool's suffixes."""
    pre = AT.ARCHS[family].prefix
    pairs, diffs = {}, {}
    for k, v in sd.items():
        name = k[len(pre):]
        if name.endswith(".lora_A.weight"):
            m = name[: -len(".lora_A.weight")]
            pairs[m] = (v, sd[f"{pre}{m}.lora_B.weight"])
        elif name.endswith(".diff_b"):
            diffs[name[: -len(".diff_b")] + ".bias"] = v
        elif name.endswith(".diff"):
            diffs[name[: -len(".diff")] + ".weight"] = v
    return pairs, diffs


def test_file_reads_as_the_tool_wrote_it(tmp_path, model, family):
    path, sd, meta = _write(tmp_path, model, family)
    lora, full = AT.network_modules(model, family, all_layers=True, full_if_contains=FULL_IF[family])
    assert path.endswith("my_lora_v1_000000500.safetensors") and all(v.dtype == torch.float16 for v in sd.values())
    adapter = lora_core.load_adapter(path)
    assert adapter.scheme == "peft"
    assert set(adapter.layers) == set(lora) and set(adapter.diffs) == set(full)
    assert all(layer.alpha == layer.rank == 4 for layer in adapter.layers.values())  # no alpha tensor: scale 1
    linears = {n for n in full if isinstance(model.get_submodule(n), nn.Linear)}
    assert linears and all(set(adapter.diffs[n]) == {"weight", "bias"} for n in linears)
    assert all(set(adapter.diffs[n]) == {"weight"} for n in set(full) - linears)  # RMSNorm: no bias
    # what `farm lora inspect` reads from the header alone
    head = header_adapter(path)
    assert dict(head.metadata) == meta and set(head.layers) == set(lora) and set(head.diffs) == set(full)
    info = summary(path, head)
    assert info["layout"] == "peft" and info["dtypes"] == {"F16": len(sd)}
    assert info["ranks"] == [4] and info["alphas"] == [4.0]
    assert info["metadata"] == {"ss_base_model_version": AT.ARCHS[family].base_model_version, "format": "pt"}
    assert json.loads(meta["training_info"]) == {"step": 500, "epoch": 3}


def _reference(before: dict, sd: dict, family: str):
    """fp64 value of every parameter the file changes, and the tool's own merged value of the
    parameters only a full-weight module touches."""
    pairs, diffs = _split(sd, family)
    ref = {f"{m}.weight": before[f"{m}.weight"].double() + S * (b.double() @ a.double()) for m, (a, b) in pairs.items()}
    tool = {}
    for p, d in diffs.items():
        ref[p] = before[p].double() + S * d.double()
        tool[p] = AT.tool_merge(before[p], d, S)
    return ref, tool, pairs


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_apply_is_what_the_tool_means_and_restores(tmp_path, model, family, mode):
    _check_apply(tmp_path, model, family, mode)


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_whole_model_network_binds_top_level_modules(tmp_path, tiny_qwen_fp32, mode):
    """``transformer_only: false``: img_in, txt_in, txt_norm (a full-weight norm), the time
    embedder, norm_out and proj_out are trained too, under the same prefix."""
    model = _model("qwen_image", tiny_qwen_fp32).to(torch.bfloat16)
    lora, full = AT.network_modules(model, "qwen_image", all_layers=True, full_if_contains=FULL_IF["qwen_image"],
                                    transformer_only=False)
    assert {"img_in", "proj_out", "norm_out.linear"} <= set(lora) and "txt_norm" in full
    _check_apply(tmp_path, model, "qwen_image", mode, transformer_only=False)


def _check_apply(tmp_path, model, family, mode, **more):
    path, sd, _ = _write(tmp_path, model, family, **more)
    before = snapshot(model)
    ref, tool, pairs = _reference(before, sd, family)
    h = lora_core.apply(model, [(path, S)], mode=mode)
    assert mode_label(h.updates, mode) == ("lowrank+merge" if mode == "lowrank" else "merge")
    now = model.state_dict()
    for p, want in tool.items():  # full-weight parts: the tool's merge_in, bit for bit, in both modes
        assert torch.equal(now[p], want), p
    g = torch.Generator().manual_seed(3)
    for m in pairs:
        w = f"{m}.weight"
        a, bb = pairs[m]
        size = before[w].double().abs() + S * bb.double().abs() @ a.double().abs()
        if mode == "merge":  # one bf16 rounding of the exact sum, after an fp32 one of the terms
            assert ((now[w].double() - ref[w]).abs() <= ref[w].abs() * 2.0 ** -8 + size * 2.0 ** -20).all(), w
            continue
        assert torch.equal(now[w], before[w]), w  # a runtime branch leaves the weight alone
        mod = model.get_submodule(m)
        x = torch.randn(5, mod.in_features, generator=g).to(torch.bfloat16)
        b = before.get(f"{m}.bias")
        y64 = x.double() @ ref[w].T + (0 if b is None else b.double())
        bound = 2.0 ** -6 * (x.double().abs() @ size.T) + 1e-6  # a bf16 forward
        assert ((mod(x).double() - y64).abs() <= bound).all(), m
    untouched = set(before) - set(ref)
    assert untouched and all(torch.equal(now[k], before[k]) for k in untouched)
    h.restore()
    assert_same(model, before)


def _peer(model: nn.Module, path: str, family: str) -> dict:
    """diffusers + PEFT: the pipeline's lora_state_dict, load_lora_adapter, fuse at S (fp32)."""
    pytest.importorskip("peft")
    import diffusers

    pipe = {"qwen_image": "QwenImagePipeline", "zimage": "ZImagePipeline", "flux": "FluxPipeline"}[family]
    sd = getattr(diffusers, pipe).lora_state_dict(path)
    peer = copy.deepcopy(model)
    peer.load_lora_adapter({k.removeprefix("transformer."): v for k, v in sd.items()}, adapter_name="a", prefix=None)
    peer.fuse_lora(lora_scale=S, adapter_names=["a"])
    peer.unload_lora()
    return peer.state_dict()


@pytest.mark.parametrize("full", [False, True])
def test_merge_matches_diffusers_peft(tmp_path, family, tiny_qwen_fp32, full):
    model = _model(family, tiny_qwen_fp32)  # fp32, as the peer's fuse runs
    path, sd, _ = _write(tmp_path, model, family, full=full)
    if full and family != "flux":
        with pytest.raises(ValueError, match="should be empty"):  # diffusers' converter leaves the diffs over
            _peer(model, path, family)
        return
    theirs = _peer(model, path, family)
    before = snapshot(model)
    _, diffs = _split(sd, family)
    h = lora_core.apply(model, [(path, S)])
    ours = model.state_dict()
    compared = 0
    for k, v in ours.items():
        if k in diffs:
            continue  # the peer drops full-weight parts; checked against the tool above
        assert torch.allclose(v, theirs[k], atol=1e-6, rtol=1e-5), k
        compared += not torch.equal(v, before[k])
    assert compared == len(_split(sd, family)[0])
    h.restore()
    assert_same(model, before)
