"""nunchaku's Qwen-Image built on the meta device from its checkpoint's safetensors header
(``workers.backends.nunchaku_meta``): the same module names, kinds and shapes as the model,
so lora_core binds a LoRA to it exactly as to the model; a header its loader would not load
is an error naming the key; a full-size layout builds and binds in bounded memory."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_core.compose import plan
from lora_core.errors import UnsupportedFormatError
from lora_core.inspection import bind_report, header_adapter
from lora_core.model_index import ModelIndex
from lora_core.synthetic import comfy_extract_state_dict, peft_state_dict, random_layers, write_safetensors
from testsupport.lora import nunchaku_qwen_standin
from tests.jobs.test_limits import run_measured
from workers.backends.base import ModelPathError
from workers.backends.nunchaku_meta import CheckpointError, meta_transformer, meta_tree

DIM, HEADS, HEAD_DIM, MLP, LAYERS, JOINT, IN_CH, OUT_CH = 64, 2, 32, 256, 2, 48, 16, 4
B0 = "transformer_blocks.0"


def standin_model(dim: int = DIM, layers: int = LAYERS) -> nn.Module:
    """The CPU stand-in (testsupport: nunchaku's quantized fields and shapes) with the unquantized
    modules nunchaku's Qwen-Image keeps (norms, embedders, output projection), in bf16."""
    model = nunchaku_qwen_standin(dim=dim, mlp=MLP, layers=layers, reference=False)
    bf16 = {"dtype": torch.bfloat16}
    for blk in model.transformer_blocks:
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(blk.attn, name, nn.RMSNorm(HEAD_DIM, **bf16))
    model.img_in = nn.Linear(IN_CH, dim, **bf16)
    model.txt_norm = nn.RMSNorm(JOINT, **bf16)
    model.txt_in = nn.Linear(JOINT, dim, **bf16)
    model.time_text_embed = nn.Module()
    model.time_text_embed.timestep_embedder = nn.Module()
    model.time_text_embed.timestep_embedder.linear_1 = nn.Linear(256, dim, **bf16)
    model.time_text_embed.timestep_embedder.linear_2 = nn.Linear(dim, dim, **bf16)
    model.norm_out = nn.Module()
    model.norm_out.linear = nn.Linear(dim, 2 * dim, **bf16)
    model.proj_out = nn.Linear(dim, 4 * OUT_CH, **bf16)
    return model


def checkpoint_metadata(layers: int = LAYERS, rank: int = 32, heads: int = HEADS, head_dim: int = HEAD_DIM) -> dict:
    """What nunchaku's merge_safetensors writes into ``__metadata__``: config, quantization_config, model_class."""
    config = {"_class_name": "QwenImageTransformer2DModel", "num_layers": layers, "attention_head_dim": head_dim,
              "num_attention_heads": heads, "joint_attention_dim": JOINT, "in_channels": IN_CH,
              "out_channels": OUT_CH, "patch_size": 2, "axes_dims_rope": [8, 12, 12]}
    quant = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
             "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}, "rank": rank}
    return {"config": json.dumps(config), "comfy_config": "{}", "model_class": "NunchakuQwenImageTransformer2DModel",
            "quantization_config": json.dumps(quant)}


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as a nunchaku checkpoint holds it (the stand-ins' reference-forward
    buffers are no field of nunchaku's)."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("dense_ref")}


def write_checkpoint(path, model: nn.Module | None = None, metadata: dict | None = None) -> str:
    """A small nunchaku-layout Qwen-Image checkpoint (``svdq-int4_r32-...safetensors``-like)."""
    save_file(checkpoint_state(model or standin_model()), str(path), metadata=metadata or checkpoint_metadata())
    return str(path)


def entries_of(model: nn.Module) -> dict[str, tuple[list[int], str]]:
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int8: "I8",
             torch.int32: "I32"}
    return {k: (list(v.shape), names[v.dtype]) for k, v in checkpoint_state(model).items()}


def qwen_image_lora_shapes(dim: int, mlp: int, layers: int, blocks=None) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of every linear a diffusers-named Qwen-Image LoRA targets in its blocks."""
    out = {}
    for i in blocks if blocks is not None else range(layers):
        b = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            out[f"{b}.attn.{name}"] = (dim, dim)
        for s in ("img", "txt"):
            out[f"{b}.{s}_mlp.net.0.proj"] = (dim, mlp)
            out[f"{b}.{s}_mlp.net.2"] = (mlp, dim)
            out[f"{b}.{s}_mod.1"] = (dim, 6 * dim)
    return out


def _good_lora(tmp_path) -> str:
    shapes = {**qwen_image_lora_shapes(DIM, MLP, LAYERS), "proj_out": (DIM, 4 * OUT_CH), "img_in": (IN_CH, DIM)}
    return write_safetensors(tmp_path / "good.safetensors",
                             peft_state_dict(random_layers(shapes, rank=4, alpha=2.0, dtype=torch.bfloat16)))


def _extract(tmp_path, packed: bool) -> str:
    """A ComfyUI LoraSave extract: pairs, a norm diff, an SVDQ bias diff, a modulation bias diff
    (nunchaku's interleaved rows) and, with ``packed``, weight diffs on packed 4-bit layers."""
    g = torch.Generator().manual_seed(3)
    diffs = {f"{B0}.attn.norm_q": {"weight": torch.randn(HEAD_DIM, generator=g)},
             f"{B0}.attn.to_out.0": {"bias": torch.randn(DIM, generator=g)},
             f"{B0}.img_mod.1": {"bias": torch.randn(6 * DIM, generator=g)},
             "proj_out": {"weight": torch.randn(4 * OUT_CH, DIM, generator=g)}}
    if packed:
        diffs[f"{B0}.attn.to_q"] = {"weight": torch.randn(DIM, DIM, generator=g)}
        diffs[f"{B0}.txt_mod.1"] = {"weight": torch.randn(6 * DIM, DIM, generator=g)}
    layers = random_layers({f"{B0}.attn.to_k": (DIM, DIM), f"{B0}.txt_mlp.net.2": (MLP, DIM)}, rank=2, seed=4)
    return write_safetensors(tmp_path / f"extract{'-packed' if packed else ''}.safetensors",
                             comfy_extract_state_dict(layers, diffs))


def _other_model_lora(tmp_path) -> str:
    """Flux names (no such modules) and a Qwen-Image one twice as wide (the fused slot does not fit)."""
    return write_safetensors(tmp_path / "other.safetensors", peft_state_dict(random_layers(
        {"single_transformer_blocks.0.attn.to_q": (DIM, DIM), "single_transformer_blocks.0.proj_mlp": (DIM, MLP),
         f"{B0}.attn.to_v": (DIM, 2 * DIM), f"{B0}.img_mlp.net.2": (2 * MLP, DIM)})))


def test_the_meta_tree_indexes_as_the_model(tmp_path):
    model = standin_model()
    tree = meta_transformer(write_checkpoint(tmp_path / "svdq-int4_r32-qwen-image.safetensors", model))
    want, got = ModelIndex(model), ModelIndex(tree)
    assert got.kinds == want.kinds
    assert {n: (got.in_features(n), got.out_features(n)) for n in got.kinds} == {
        n: (want.in_features(n), want.out_features(n)) for n in want.kinds}
    assert got.slots == want.slots and got.underscored == want.underscored and got.nunchaku_layout
    assert set(got.kinds.values()) == {"svdq", "awq", "linear"}
    qkv = tree.get_submodule(f"{B0}.attn.to_qkv")
    assert type(qkv).__name__ == "SVDQW4A4Linear" and qkv.rank == 32 and qkv.precision == "int4"
    want_state = checkpoint_state(model)
    got_state = tree.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in got_state.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in want_state.items()}
    assert all(v.is_meta for v in got_state.values())  # nothing allocated


@pytest.mark.parametrize("which", ["good", "extract", "packed", "other"])
def test_a_lora_binds_to_the_meta_tree_as_to_the_model(tmp_path, which):
    """Same file, stand-in model vs the tree built from the stand-in's saved header: the same
    bind report (what binds where, what is refused and why, by key), and the same plan."""
    model = standin_model()
    tree = meta_transformer(write_checkpoint(tmp_path / "ck.safetensors", model))
    path = {"good": lambda: _good_lora(tmp_path), "extract": lambda: _extract(tmp_path, packed=False),
            "packed": lambda: _extract(tmp_path, packed=True), "other": lambda: _other_model_lora(tmp_path)}[which]()
    adapter = header_adapter(path)
    want, got = bind_report(adapter, ModelIndex(model)), bind_report(adapter, ModelIndex(tree))
    assert got == want
    if which == "good":
        assert not got["refused"] and len(got["bound"]) == len(adapter.layers)
        assert got["bound"][f"{B0}.attn.to_k"] == [f"{B0}.attn.to_qkv"]
    elif which == "extract":
        assert not got["refused"] and "diffusion_model.proj_out.diff" in got["bound"]
    elif which == "packed":
        assert sorted(got["refused"]) == [f"diffusion_model.{B0}.attn.to_q.diff",
                                          f"diffusion_model.{B0}.txt_mod.1.diff"]
        assert all(w.startswith("UnsupportedFormatError") and "quantized (packed) weight" in w
                   for w in got["refused"].values()), got
        assert f"diffusion_model.{B0}.img_mod.1.diff_b" in got["bound"]
    else:
        assert set(got["refused"]) == set(adapter.layers) and not got["bound"]
        assert got["refused"][f"{B0}.img_mlp.net.2"].startswith(
            f"ShapeMismatchError: LoRA down has {2 * MLP} inputs but module '{B0}.img_mlp.net.2' takes {MLP}")
        assert "outside module" in got["refused"][f"{B0}.attn.to_v"]
    if which in ("good", "extract"):  # the whole file, real factors: the plan reads only the model's shapes
        from lora_core.adapter import load_adapter_file

        real = load_adapter_file(path)
        a, b = plan([(real, 0.7)], ModelIndex(model)), plan([(real, 0.7)], ModelIndex(tree))
        assert a.keys() == b.keys()
        for name, u in a.items():
            v = b[name]
            assert u.kind == v.kind
            for field in ("A", "B", "diff", "diff_b"):
                x, y = getattr(u, field), getattr(v, field)
                assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), (name, field)


def test_a_packed_diff_on_the_meta_tree_is_refused_as_on_the_model(tmp_path):
    model = standin_model()
    tree = meta_transformer(write_checkpoint(tmp_path / "ck.safetensors", model))
    adapter = header_adapter(_extract(tmp_path, packed=True))
    for root in (model, tree):
        with pytest.raises(UnsupportedFormatError, match=r"2 full-weight diff\(s\) target a quantized"):
            plan([(adapter, 1.0)], ModelIndex(root))


def _broken(mutate) -> tuple[dict, dict]:
    entries, metadata = entries_of(standin_model()), checkpoint_metadata()
    mutate(entries, metadata)
    return entries, metadata


QKV = f"{B0}.attn.to_qkv"
MOD = f"{B0}.img_mod.1"
BAD_HEADERS = {
    "missing field": (lambda e, m: e.pop(f"{QKV}.proj_up"), f"{QKV}.proj_up", "missing: an SVDQW4A4Linear has"),
    "unknown field": (lambda e, m: e.update({f"{QKV}.lora_down": ([64, 16], "BF16")}), f"{QKV}.lora_down",
                      "a field an SVDQW4A4Linear does not have"),
    "wscales shape": (lambda e, m: e.update({f"{QKV}.wscales": ([2, 192], "BF16")}), f"{QKV}.wscales",
                      "shape [2, 192], expected [1, 192]"),
    "qweight dtype": (lambda e, m: e.update({f"{QKV}.qweight": ([192, 32], "I32")}), f"{QKV}.qweight",
                      "dtype torch.int32, expected torch.int8"),
    "up rank": (lambda e, m: e.update({f"{QKV}.proj_up": ([192, 16], "BF16")}), f"{QKV}.proj_up",
                "shape [192, 16], expected [192, 32]"),
    "awq zeros": (lambda e, m: e.update({f"{MOD}.wzeros": ([1, 192], "BF16")}), f"{MOD}.wzeros",
                  "shape [1, 192], expected [1, 384]"),
    "packed alone": (lambda e, m: [e.pop(f"{MOD}.wzeros")], f"{MOD}.qweight", "a packed field without the rest"),
    "dense 3-D": (lambda e, m: e.update({"proj_out.weight": ([16, 64, 1], "BF16")}), "proj_out.weight",
                  "a 3-D weight"),
    "top-level tensor": (lambda e, m: e.update({"scale": ([1], "F32")}), "scale", "a tensor outside any module"),
    "tensor and module": (lambda e, m: e.update({"proj_out.weight.weight": ([4], "BF16")}), "proj_out.weight.weight",
                          "'proj_out.weight' is a tensor of this header and also a module on this key's path"),
    "empty path part": (lambda e, m: e.update({"proj_out..weight": ([4], "BF16")}), "proj_out..weight",
                        "module 'proj_out.' cannot be placed in the tree: module name can't be empty string"),
    "rank vs config": (lambda e, m: m.update({"quantization_config": json.dumps({"rank": 128})}),
                       f"{B0}.attn.add_qkv_proj.proj_down", "rank 32, but quantization_config says 128"),
    "fp4 config": (lambda e, m: m.update({"quantization_config": json.dumps(
        {"rank": 32, "weight": {"dtype": "fp4_e2m1_all"}})}), f"{B0}.attn.add_qkv_proj.wscales", "int4 scales"),
    "fewer blocks": (lambda e, m: m.update({"config": json.dumps({"num_layers": 3, "num_attention_heads": HEADS,
                                                                   "attention_head_dim": HEAD_DIM})}),
                     "transformer_blocks.2.attn.to_qkv.qweight", "missing: config num_layers is 3"),
    "more blocks": (lambda e, m: m.update({"config": json.dumps({"num_layers": 1, "num_attention_heads": HEADS,
                                                                  "attention_head_dim": HEAD_DIM})}),
                    "transformer_blocks.1.attn.add_qkv_proj.bias", "a block past config num_layers = 1"),
    "width vs config": (lambda e, m: m.update({"config": json.dumps({"num_layers": LAYERS, "num_attention_heads": 3,
                                                                      "attention_head_dim": HEAD_DIM})}),
                        f"{QKV}.qweight", "64 -> 192, but config's heads x head_dim = 96"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_a_header_its_loader_would_not_load_is_named_by_key(case):
    mutate, key, why = BAD_HEADERS[case]
    entries, metadata = _broken(mutate)
    with pytest.raises(CheckpointError) as e:
        meta_tree(entries, metadata, source="ck.safetensors")
    assert e.value.key == key, str(e.value)
    assert str(e.value).startswith(f"ck.safetensors: key {key!r}: ") and why in str(e.value), str(e.value)


@pytest.mark.parametrize("metadata, why", [
    ({}, "no 'config' in its safetensors metadata"),
    ({"config": "{not json"}, "metadata 'config' is not valid JSON"),
    ({"config": '{"a": ' * 100_000}, "metadata 'config' is not valid JSON: RecursionError"),  # too deep to parse
    ({**checkpoint_metadata(), "quantization_config": "[" * 100_000}, "metadata 'quantization_config' is not valid"),
    ({**checkpoint_metadata(), "model_class": "NunchakuFluxTransformer2dModel"},
     "a NunchakuFluxTransformer2dModel checkpoint: the nunchaku backend loads Qwen-Image"),
])
def test_metadata_its_loader_needs(metadata, why):
    with pytest.raises(CheckpointError, match=why):
        meta_tree(entries_of(standin_model()), metadata, source="ck.safetensors")


def test_a_weight_dtype_that_is_no_name_is_not_checked():
    """quantization_config's weight dtype as a list (no name nunchaku knows): the int4/nvfp4 check skips it, as an
    unknown name, instead of failing on it unnamed."""
    quant = json.dumps({"rank": 32, "weight": {"dtype": ["int4"]}})
    tree = meta_tree(entries_of(standin_model()), {**checkpoint_metadata(), "quantization_config": quant})
    assert tree.get_submodule(QKV).precision == "int4"


def test_a_file_that_is_no_nunchaku_checkpoint_is_named(tmp_path):
    dense = write_safetensors(tmp_path / "dense.safetensors", {"proj_out.weight": torch.zeros(4, 8)},
                              metadata=checkpoint_metadata())
    with pytest.raises(CheckpointError, match=r"dense\.safetensors: no SVDQW4A4Linear layer"):
        meta_transformer(dense)
    with pytest.raises(ModelPathError, match="nunchaku transformer not found"):
        meta_transformer(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelPathError, match=r"not a readable safetensors checkpoint: .*junk\.safetensors"):
        meta_transformer(tmp_path / "junk.safetensors")


def qwen_image_entries(layers: int = 60, dim: int = 3072, rank: int = 32, mlp: int = 12288, joint: int = 3584,
                       head_dim: int = 128) -> dict[str, tuple[list[int], str]]:
    """The header of nunchaku's svdq-int4_r32-qwen-image checkpoint, written out from its layer
    definitions (``SVDQW4A4Linear``/``AWQW4A16Linear`` fields; diffusers' Qwen-Image modules)."""
    e: dict[str, tuple[list[int], str]] = {}

    def svdq(p, n_in, n_out):
        e.update({f"{p}.qweight": ([n_out, n_in // 2], "I8"), f"{p}.wscales": ([n_in // 64, n_out], "BF16"),
                  f"{p}.smooth_factor": ([n_in], "BF16"), f"{p}.smooth_factor_orig": ([n_in], "BF16"),
                  f"{p}.proj_down": ([n_in, rank], "BF16"), f"{p}.proj_up": ([n_out, rank], "BF16"),
                  f"{p}.bias": ([n_out], "BF16")})

    def awq(p, n_in, n_out):
        e.update({f"{p}.qweight": ([n_out // 4, n_in // 2], "I32"), f"{p}.wscales": ([n_in // 64, n_out], "BF16"),
                  f"{p}.wzeros": ([n_in // 64, n_out], "BF16"), f"{p}.bias": ([n_out], "BF16")})

    def dense(p, n_in, n_out=None):
        e[f"{p}.weight"] = ([n_out, n_in], "BF16") if n_out else ([n_in], "BF16")
        if n_out:
            e[f"{p}.bias"] = ([n_out], "BF16")

    for i in range(layers):
        b = f"transformer_blocks.{i}"
        svdq(f"{b}.attn.to_qkv", dim, 3 * dim)
        svdq(f"{b}.attn.add_qkv_proj", dim, 3 * dim)
        svdq(f"{b}.attn.to_out.0", dim, dim)
        svdq(f"{b}.attn.to_add_out", dim, dim)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            dense(f"{b}.attn.{norm}", head_dim)
        for s in ("img", "txt"):
            awq(f"{b}.{s}_mod.1", dim, 6 * dim)
            svdq(f"{b}.{s}_mlp.net.0.proj", dim, mlp)
            svdq(f"{b}.{s}_mlp.net.2", mlp, dim)
    dense("img_in", 64, dim)
    dense("txt_norm", joint)
    dense("txt_in", joint, dim)
    dense("time_text_embed.timestep_embedder.linear_1", 256, dim)
    dense("time_text_embed.timestep_embedder.linear_2", dim, dim)
    dense("norm_out.linear", dim, 2 * dim)
    dense("proj_out", dim, 64)
    return e


FULL_SIZE_META = {"config": json.dumps({"_class_name": "QwenImageTransformer2DModel", "num_layers": 60,
                                        "attention_head_dim": 128, "num_attention_heads": 24}),
                  "quantization_config": json.dumps({"rank": 32, "weight": {"dtype": "int4"}}),
                  "model_class": "NunchakuQwenImageTransformer2DModel"}

FULL_SIZE_BIND = """
import json, torch
from lora_core.inspection import bind_report, header_adapter
from lora_core.model_index import ModelIndex
from tests.workers.test_nunchaku_meta import FULL_SIZE_META, qwen_image_entries
from workers.backends.nunchaku_meta import meta_tree
entries = qwen_image_entries()
nbytes = sum(torch.Size(s).numel() * {"I8": 1, "I32": 4, "BF16": 2}[d] for s, d in entries.values())
tree = meta_tree(entries, FULL_SIZE_META)
index = ModelIndex(tree)
report = bind_report(header_adapter(LORA), index)
print("@R" + json.dumps({"bytes": nbytes, "kinds": sorted(set(index.kinds.values())), "modules": len(index.kinds),
                         "bound": len(report["bound"]), "refused": report["refused"]}))
"""


def test_full_size_qwen_image_layout_builds_and_binds_in_bounded_memory(tmp_path):
    """60 blocks, 3072 wide, rank 32: the tree from the header's shapes alone, and a LoRA on all
    840 linears of its blocks bound to it, in a fresh process whose peak RSS stays far below the
    checkpoint's ~11 GB (nothing allocated: the tree is meta)."""
    shapes = qwen_image_lora_shapes(3072, 12288, 60)
    assert len(shapes) == 840
    shapes["transformer_blocks.59.attn.to_k"] = (2048, 2048)  # written for a narrower model
    lora = write_safetensors(tmp_path / "qwen.safetensors",
                             peft_state_dict(random_layers(shapes, rank=1, dtype=torch.bfloat16)))
    rc, out, seconds, mb, base = run_measured("import sys", f"LORA = {lora!r}; exec({FULL_SIZE_BIND!r})",
                                              timeout=300)
    assert rc == 0, out
    result = json.loads(out.split("@R", 1)[1].splitlines()[0])
    assert result["kinds"] == ["awq", "linear", "svdq"] and result["modules"] == 60 * 10 + 6
    assert result["bound"] == 839 and list(result["refused"]) == ["transformer_blocks.59.attn.to_k"]
    assert result["refused"]["transformer_blocks.59.attn.to_k"].startswith("ShapeMismatchError: LoRA down has 2048")
    assert result["bytes"] > 10 * 2**30  # the int4 checkpoint's tensors: ~11 GB
    assert mb < 1024 and mb * 2**20 < result["bytes"] / 10, (mb, base, seconds)
