"""`farm lora inspect FILE [--model SPEC] [--json]`: layout, ranks, alphas, dtypes, size, targets, and
with a model what binds and what is refused and why; read from the header, bound on the meta device."""
from __future__ import annotations

import json

import torch

from farm.cli import main
from lora_core.inspection import bind_report, header_adapter
from lora_core.model_index import ModelIndex
from lora_core.synthetic import kohya_state_dict, linear_shapes, peft_state_dict, random_layers, write_safetensors
from workers.backends.tiny import TINY_TRANSFORMER_CONFIG, meta_transformer

TARGETS = ("attn.to_q", "attn.to_v", "img_mlp.net.2")


def _kohya(tmp_path) -> str:
    layers = random_layers(linear_shapes(meta_transformer(), TARGETS), rank=4, alpha=2.0, dtype=torch.bfloat16)
    return write_safetensors(tmp_path / "k.safetensors", kohya_state_dict(layers),
                             metadata={"ss_network_dim": "4", "ss_network_alpha": "2", "ss_other": "x"})


def test_inspect_text_and_json(tmp_path, capsys):
    path = _kohya(tmp_path)
    assert main(["lora", "inspect", path]) == 0
    text = capsys.readouterr().out
    assert "layout   kohya" in text and "rank(s)  4" in text and "alpha(s) 2" in text
    assert "BF16" in text and "ss_network_alpha=2" in text and "ss_other" not in text
    assert "transformer_blocks_0_attn_to_q" in text
    assert len(text.splitlines()) <= 24  # one screen
    assert main(["lora", "inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "kohya" and info["ranks"] == [4] and info["alphas"] == [2.0]
    assert info["dtypes"] == {"BF16": 12, "F32": 6}  # 6 layers x (down, up) and 6 alpha scalars
    assert len(info["targets"]) == 6 and "binding" not in info
    assert info["targets"]["transformer_blocks_1_img_mlp_net_2"] == {"rank": 4, "alpha": 2.0, "in": 512, "out": 128}


def test_inspect_with_model_lists_what_binds_and_what_is_refused(tmp_path, capsys):
    inner = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    layers = random_layers({"transformer_blocks.0.attn.to_q": (inner, inner),
                            "transformer_blocks.0.attn.to_k": (inner + 1, inner),  # one input too many
                            "transformer_blocks.7.attn.to_q": (inner, inner)})  # the tiny model has 2 blocks
    path = write_safetensors(tmp_path / "p.safetensors", peft_state_dict(layers))
    assert main(["lora", "inspect", path, "--model", "tiny", "--json"]) == 2
    binding = json.loads(capsys.readouterr().out)["binding"]
    assert binding["bound"] == {"transformer_blocks.0.attn.to_q": ["transformer_blocks.0.attn.to_q"]}
    refused = binding["refused"]
    assert refused["transformer_blocks.0.attn.to_k"].startswith(
        f"ShapeMismatchError: LoRA down has {inner + 1} inputs but module 'transformer_blocks.0.attn.to_k' "
        f"takes {inner}")
    assert refused["transformer_blocks.7.attn.to_q"].startswith("TargetNotFoundError")
    assert main(["lora", "inspect", path, "--model", "tiny"]) == 2
    text = capsys.readouterr().out
    assert "binds    1 target(s), 2 refused" in text and "refused transformer_blocks.7.attn.to_q" in text


def test_inspect_model_dir_from_config_only(tmp_path, capsys):
    """A diffusers dir with only transformer/config.json: built on meta, no weight file needed."""
    from diffusers import QwenImageTransformer2DModel

    model_dir = tmp_path / "model"
    (model_dir / "transformer").mkdir(parents=True)
    (model_dir / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": QwenImageTransformer2DModel.__name__, **TINY_TRANSFORMER_CONFIG}))
    spec = json.dumps({"backend": "diffusers", "path": str(model_dir)})
    assert main(["lora", "inspect", _kohya(tmp_path), "--model", spec, "--json"]) == 0
    binding = json.loads(capsys.readouterr().out)["binding"]
    assert len(binding["bound"]) == 6 and binding["refused"] == {}
    assert main(["lora", "inspect", _kohya(tmp_path), "--model", json.dumps({"backend": "diffusers",
                                                                          "path": str(tmp_path)})]) == 2
    err = capsys.readouterr().err
    assert "ModelPathError" in err and "no transformer/config.json" in err and str(tmp_path) in err


def test_inspect_bad_file_names_it(tmp_path, capsys):
    path = _kohya(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    assert main(["lora", "inspect", path]) == 2
    err = capsys.readouterr().err
    assert "CorruptFileError" in err and path in err
    assert main(["lora", "inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such LoRA file" in capsys.readouterr().err


def test_header_bind_matches_a_real_load(tmp_path):
    """The meta bind lands every target where a real load + plan on the real model does."""
    from lora_core.adapter import load_adapter_file
    from lora_core.compose import plan
    from workers.backends.tiny import build_tiny_pipeline

    path = _kohya(tmp_path)
    meta = header_adapter(path)
    real = load_adapter_file(path)
    assert meta.content_id == real.content_id and set(meta.layers) == set(real.layers)
    assert all(meta.layers[t].alpha == real.layers[t].alpha and meta.layers[t].A.is_meta for t in meta.layers)
    report = bind_report(meta, ModelIndex(meta_transformer()))
    real_plan = plan([(real, 1.0)], ModelIndex(build_tiny_pipeline().transformer))
    assert sorted(m for ms in report["bound"].values() for m in ms) == sorted(real_plan)


def test_inspect_binds_full_weight_diffs_by_key(tmp_path, capsys):
    """ComfyUI-style ``.diff``/``.diff_b`` beside the low-rank pairs: each bound or refused by its key."""
    head = TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    inner = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * head
    sd = kohya_state_dict(random_layers({"transformer_blocks.0.attn.to_q": (inner, inner)}))
    sd["lora_unet_transformer_blocks_0_attn_norm_q.diff"] = torch.zeros(head)
    sd["lora_unet_transformer_blocks_0_attn_to_q.diff_b"] = torch.zeros(inner)
    sd["lora_unet_transformer_blocks_0_attn_to_k.diff_b"] = torch.zeros(inner + 3)  # not the bias's shape
    path = write_safetensors(tmp_path / "d.safetensors", sd)
    assert main(["lora", "inspect", path, "--model", "tiny", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["diffs"]["transformer_blocks_0_attn_norm_q"] == {"weight": [head]}
    bound, refused = out["binding"]["bound"], out["binding"]["refused"]
    assert bound["lora_unet_transformer_blocks_0_attn_norm_q.diff"] == ["transformer_blocks.0.attn.norm_q"]
    assert bound["lora_unet_transformer_blocks_0_attn_to_q.diff_b"] == ["transformer_blocks.0.attn.to_q"]
    assert list(refused) == ["lora_unet_transformer_blocks_0_attn_to_k.diff_b"]
    assert refused["lora_unet_transformer_blocks_0_attn_to_k.diff_b"].startswith(
        f"ShapeMismatchError: diff has shape ({inner + 3},)")
