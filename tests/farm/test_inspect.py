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
    assert "binds    1 target(s), 2 refused" in text
    assert "refused 1 TargetNotFoundError: transformer_blocks.7.attn.to_q" in text
    assert "refused 1 ShapeMismatchError: transformer_blocks.0.attn.to_k" in text


def test_a_file_for_another_model_fits_one_screen(tmp_path, capsys):
    """A full-size Qwen-Image LoRA (60 blocks x 14 linears, 3072 wide) against the tiny model
    (2 blocks, 128 wide): 840 refusals, grouped by reason with a count, the first keys and the
    first message, in one screen; --json still lists every target and every refusal."""
    block0 = linear_shapes(meta_transformer(), ("transformer_blocks.0.",))
    assert len(block0) == 14
    shapes = {k.replace("transformer_blocks.0.", f"transformer_blocks.{n}."): (i * 24, o * 24)
              for n in range(60) for k, (i, o) in block0.items()}
    path = write_safetensors(tmp_path / "qwen.safetensors",
                             kohya_state_dict(random_layers(shapes, rank=1, dtype=torch.bfloat16)))
    assert main(["lora", "inspect", path, "--model", "tiny"]) == 2
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) <= 24, text
    assert "  targets  840:" in lines and "    ... (834 more; --json lists all)" in lines
    assert "  binds    0 target(s), 840 refused" in lines
    # blocks 0-1 exist but are 128 wide (2 x 14 = 28); blocks 2-59 do not exist (58 x 14 = 812)
    missing = [l for l in lines if l.startswith("    refused 812 TargetNotFoundError: ")]
    shape = [l for l in lines if l.startswith("    refused 28 ShapeMismatchError: ")]
    assert len(missing) == 1 and missing[0].endswith(" +810 more"), text
    assert len(shape) == 1 and "transformer_blocks_0_attn_add_k_proj" in shape[0], text
    assert lines.index(missing[0]) < lines.index(shape[0])  # most keys first
    assert any(l.startswith("      e.g. transformer_blocks_0_attn_add_k_proj: LoRA down has 3072 inputs but module "
                            "'transformer_blocks.0.attn.add_k_proj' takes 128") for l in lines), text
    assert all(len(l) <= 200 for l in lines)
    assert main(["lora", "inspect", path, "--model", "tiny", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert len(out["targets"]) == 840 and out["binding"]["bound"] == {}
    refused = out["binding"]["refused"]
    assert len(refused) == 840
    assert sum(why.startswith("TargetNotFoundError") for why in refused.values()) == 812


def test_many_reasons_still_fit_one_screen():
    """More reasons than the screen holds: the rest are summed up in one line."""
    from lora_core.inspection import format_summary

    info = {"file": "f", "layout": "kohya", "bytes": 1, "tensors": 2, "dtypes": {"F32": 2}, "ranks": [1],
            "alphas": [1.0], "metadata": {}, "diffs": {},
            "targets": {f"t{i}": {"rank": 1, "alpha": 1.0, "in": 1, "out": 1} for i in range(30)}}
    refused = {f"t{i}": f"Error{i % 7}: why {i}" for i in range(30)}
    text = format_summary(info, {"bound": {}, "refused": refused})
    lines = text.splitlines()
    assert len(lines) <= 24, text
    assert "    refused 5 Error0: t0, t7 +3 more" in lines  # t0 t7 t14 t21 t28, in the order given
    assert lines[-1].startswith("    ... (") and "4 other reason(s)" in lines[-1], text


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


def test_nunchaku_converted_qwen_image_files(tmp_path, capsys):
    """nunchaku's Qwen-Image converter keeps the model's own module names with bare, packed
    ``.lora_down``/``.lora_up`` (``testsupport/nunchaku_converter.py``): shown as that layout with the
    unpacked shapes; on the tiny (dense) model a file converted without a base binds like any LoRA, one
    converted against a checkpoint is refused per target (its base part cannot be checked there); a
    bare key beside ordinary kohya pairs is refused by name."""
    import pytest

    from lora_core.errors import UnsupportedFormatError
    from testsupport.lora import nunchaku_qwen_standin
    from testsupport.nunchaku_converter import to_nunchaku

    inner = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    lora = random_layers({**{f"transformer_blocks.0.attn.{c}": (inner, inner) for c in ("to_q", "to_k", "to_v")},
                          "transformer_blocks.0.img_mod.1": (inner, 6 * inner)}, rank=4, dtype=torch.bfloat16)
    free = write_safetensors(tmp_path / "nobase.safetensors", to_nunchaku(lora))
    assert main(["lora", "inspect", free, "--model", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "layout   nunchaku-converted (packed; converted without a base: an ordinary LoRA)" in text, text
    assert "transformer_blocks.0.attn.to_qkv  r=16 alpha=16" in text and "binds    2 target(s), 0 refused" in text
    path = write_safetensors(tmp_path / "qwen_svdq_lora.safetensors",
                             to_nunchaku(lora, base=nunchaku_qwen_standin(inner, 4 * inner, layers=1)))
    assert main(["lora", "inspect", path, "--model", "tiny", "--json"]) == 2
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "nunchaku-converted" and info["base_part"] is True
    refused = info["binding"]["refused"]
    assert len(refused) == 8 and info["binding"]["bound"] == {"transformer_blocks.0.img_mod.1": [
        "transformer_blocks.0.img_mod.1"]}
    assert all("every block this file touches has all eight of nunchaku's SVDQ layers" in why for why in refused.values())
    # one bare key beside ordinary kohya pairs: the file is refused by that key's name
    only_mod = {k: v for k, v in to_nunchaku(lora).items() if "img_mod" in k}
    mixed = write_safetensors(tmp_path / "mixed.safetensors", {
        **kohya_state_dict(random_layers({"transformer_blocks.0.attn.to_q": (inner, inner)})), **only_mod})
    with pytest.raises(UnsupportedFormatError, match=r"nunchaku-converted LoRA \(key 'transformer_blocks\.0\.img_mod"
                                                     r"\.1\.lora_down'\): bare nunchaku factors mixed with 3 other"):
        header_adapter(mixed)
    # without the bare keys the same pairs load (kohya's .lora_down.weight is not bare)
    assert set(header_adapter(write_safetensors(tmp_path / "k.safetensors", kohya_state_dict(
        random_layers({"transformer_blocks.0.attn.to_q": (inner, inner)})))).layers) == {
        "transformer_blocks_0_attn_to_q"}


def test_inspect_binds_on_the_nunchaku_backend_from_its_checkpoint_header(tmp_path, capsys):
    """`--model '{"backend": "nunchaku", "path": CHECKPOINT}'`: the file bound to the transformer
    built on meta from the checkpoint's header; without a path, or with a path that holds no
    checkpoint, a clear exit 2 naming what is wrong, not a traceback."""
    from tests.workers.test_nunchaku_meta import _extract, _good_lora, write_checkpoint

    spec = json.dumps({"backend": "nunchaku", "path": write_checkpoint(tmp_path / "svdq-qwen-image.safetensors")})
    good = _good_lora(tmp_path)
    assert main(["lora", "inspect", good, "--model", spec, "--json"]) == 0
    binding = json.loads(capsys.readouterr().out)["binding"]
    assert not binding["refused"] and binding["bound"]["transformer_blocks.0.attn.to_q"] == [
        "transformer_blocks.0.attn.to_qkv"]
    assert binding["bound"]["transformer_blocks.1.img_mod.1"] == ["transformer_blocks.1.img_mod.1"]
    assert main(["lora", "inspect", _extract(tmp_path, packed=True), "--model", spec]) == 2
    text = capsys.readouterr().out
    assert "refused 2 UnsupportedFormatError: diffusion_model.transformer_blocks.0.attn.to_q.diff, " in text, text
    for bad, why in (("nunchaku", 'ModelPathError: the nunchaku backend needs a "path" (its .safetensors checkpoint)'),
                     (json.dumps({"backend": "nunchaku", "path": str(tmp_path / "absent.safetensors")}),
                      "ModelPathError: nunchaku transformer not found"),
                     (json.dumps({"backend": "nunchaku", "path": good}),
                      f"CheckpointError: {good}: no 'config' in its safetensors metadata"),
                     ("flux", "ValueError: --model: binding is checked for tiny, diffusers, nunchaku, not for backend "
                              "'flux'")):
        assert main(["lora", "inspect", good, "--model", bad]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"farm lora inspect: {why}"), captured.err
        assert "Traceback" not in captured.err
    assert main(["lora", "inspect", good]) == 0  # the file alone still reads


def test_untrusted_header_text_cannot_add_lines_or_escapes(tmp_path):
    """Header metadata is the file's own text: a newline or a terminal escape in it is shown as
    '?', so the screen keeps its lines and the terminal its state."""
    import torch
    from safetensors.torch import save_file

    from lora_core.inspection import format_summary, summary

    tensors = {"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}
    path, clean = tmp_path / "hostile.safetensors", tmp_path / "clean.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_alpha": "1\n2\n3\n4\x1b[2J", "ss_network_module": "x\ry"})
    save_file(tensors, str(clean), metadata={"ss_network_alpha": "1", "ss_network_module": "x"})
    text = format_summary(summary(str(path)))
    assert "\x1b" not in text and "\r" not in text
    assert len(text.splitlines()) == len(format_summary(summary(str(clean))).splitlines())
    assert all(line.isprintable() for line in text.splitlines()), text
