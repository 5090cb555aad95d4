"""`farm validate --deep`: every LoRA fetched (node cache), checksummed, its header parsed and bound to
the model built on the meta device; every problem listed at once, nothing rendered, in seconds and
bounded memory (measured in a fresh process), even for a full-size Qwen-Image config."""
from __future__ import annotations

import hashlib
import inspect
import json
import os

import pytest
import torch

from lora_core.synthetic import kohya_state_dict, linear_shapes, peft_state_dict, random_layers, write_safetensors
from tests.jobs.test_limits import run_measured
from tests.storage.servers import FaultyHTTPServer
from workers.backends.tiny import meta_transformer

TINY_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "img_mlp.net.2")


def _tiny_lora(path, seed: int = 0, kohya: bool = False) -> str:
    layers = random_layers(linear_shapes(meta_transformer(), TINY_TARGETS), rank=4, seed=seed, alpha=2.0)
    return write_safetensors(path, kohya_state_dict(layers) if kohya else peft_state_dict(layers))


def _manifest(tmp_path, loras: list, model: dict | None = None) -> str:
    jobs = [{"id": f"j{i}", "prompt": "a cat", "seed": i, "steps": 2, "width": 64, "height": 64, "loras": [ref]}
            for i, ref in enumerate(loras)]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model": model or {"backend": "tiny"}, "output": str(tmp_path / "out"), "jobs": jobs}))
    return str(path)


def _deep(manifest: str, cache) -> tuple[int, str, float, int, int]:
    return run_measured("from farm.cli import main", f"rc = main(['validate', {manifest!r}, '--deep'])",
                        LORA_FARM_CACHE=str(cache))


def test_deep_lists_every_problem_and_not_the_good_file(tmp_path):
    good = _tiny_lora(tmp_path / "good.safetensors", kohya=True)
    bad_sum = _tiny_lora(tmp_path / "badsum.safetensors", seed=1)
    truncated = _tiny_lora(tmp_path / "truncated.safetensors", seed=2)
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) - 100])  # the header promises bytes the file lacks
    # a LoRA for another model: Flux's single blocks, which the (Qwen-Image) tiny model has none of
    other = write_safetensors(tmp_path / "flux.safetensors", peft_state_dict(random_layers(
        {"single_transformer_blocks.0.attn.to_q": (128, 128), "single_transformer_blocks.0.proj_mlp": (128, 512)})))
    missing = str(tmp_path / "missing.safetensors")
    wrong_sha = hashlib.sha256(b"not this file").hexdigest()
    manifest = _manifest(tmp_path, [good, {"uri": bad_sum, "sha256": wrong_sha}, truncated, other, missing])
    rc, out, seconds, mb, _ = _deep(manifest, tmp_path / "cache")
    assert rc == 2, out
    assert "5 LoRA problem(s)" in out  # four files: one line each, the foreign one's per key (two)
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert any(p.startswith(f"{missing}: PermanentFetchError") for p in problems), out
    assert any(p.startswith(f"{bad_sum}: ChecksumMismatch") and wrong_sha in p for p in problems), out
    assert any(p.startswith(f"{truncated}: CorruptFileError") and "truncated" in p for p in problems), out
    for key in ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"):
        assert any(p.startswith(f"{other}: key {key}: TargetNotFoundError") for p in problems), out
    assert len(problems) == 5, out
    assert good not in out
    assert not (tmp_path / "out").exists()  # nothing rendered, no output written
    assert seconds < 15, seconds
    assert mb < 1500, mb


def test_deep_ok_exits_0_and_fills_the_node_cache(tmp_path):
    good = _tiny_lora(tmp_path / "good.safetensors")
    data = open(good, "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    with FaultyHTTPServer() as srv:
        url = srv.add("/lora.safetensors", data)
        manifest = _manifest(tmp_path, [good, {"uri": url, "sha256": sha}])
        env = {"LORA_FARM_LORA_PROTOCOLS": "http", "LORA_FARM_LORA_HOSTS": "127.0.0.1"}
        rc, out, _, _, _ = run_measured("from farm.cli import main",
                                        f"rc = main(['validate', {manifest!r}, '--deep'])",
                                        LORA_FARM_CACHE=str(tmp_path / "cache"), **env)
        assert rc == 0, out
        assert "ok, 2 job(s)" in out
        assert srv.gets("/lora.safetensors") == 1
        # the workers' store, on the same cache, now serves it without a transfer
        from storage.store import LoraStore

        hit = LoraStore(tmp_path / "cache").fetch(url, sha)
        assert hit.cached and open(hit.path, "rb").read() == data
        assert srv.gets("/lora.safetensors") == 1


def test_deep_respects_the_uri_policy(tmp_path, monkeypatch):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    lora = _tiny_lora(outside / "x.safetensors")
    from farm.deep_validate import deep_problems
    from jobs.manifest import load_manifest

    monkeypatch.setenv("LORA_FARM_LORA_ROOTS", str(outside))  # allowed while the manifest loads ...
    m = load_manifest(_manifest(tmp_path, [lora]))
    monkeypatch.delenv("LORA_FARM_LORA_ROOTS")  # ... refused when the files are fetched, as a worker would
    problems, _ = deep_problems(m, cache_dir=str(tmp_path / "cache"))
    assert len(problems) == 1 and problems[0].startswith(f"{lora}: ForbiddenUriError"), problems


QWEN_IMAGE_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                      "transformer_blocks.59.img_mlp.net.2", "transformer_blocks.59.txt_mod.1")


@pytest.fixture(scope="module")
def qwen_image_dir(tmp_path_factory):
    """A diffusers pipeline dir holding only the full-size Qwen-Image transformer config (no weights)."""
    from diffusers import QwenImageTransformer2DModel

    root = tmp_path_factory.mktemp("qwen-image")
    (root / "transformer").mkdir()
    config = {"_class_name": "QwenImageTransformer2DModel", "num_layers": 60, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 3584, "in_channels": 64, "out_channels": 16,
              "patch_size": 2, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
    defaults = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    for name in ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim"):
        assert defaults[name].default == config[name]  # diffusers' defaults are the released model's
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    return root


def test_full_size_qwen_image_binds_on_meta_in_seconds(tmp_path, qwen_image_dir):
    from workers.backends.diffusers_backend import meta_transformer as meta_from_dir

    model = meta_from_dir(qwen_image_dir)
    shapes = linear_shapes(model, QWEN_IMAGE_TARGETS)
    assert shapes["transformer_blocks.0.attn.to_q"] == (3072, 3072)
    assert len(model.transformer_blocks) == 60
    assert sum(p.numel() for p in model.parameters()) > 20e9 and next(model.parameters()).is_meta
    every = linear_shapes(model, ("transformer_blocks.",))  # all 840 linears of the 60 blocks, rank 1
    assert len(every) == 840 and set(shapes) <= set(every)
    good = write_safetensors(tmp_path / "qwen.safetensors",
                             kohya_state_dict(random_layers(every, rank=1, dtype=torch.bfloat16)))
    # written for a smaller model: 2048 wide, the widths do not fit
    bad = write_safetensors(tmp_path / "small.safetensors", peft_state_dict(random_layers(
        {"transformer_blocks.0.attn.to_q": (2048, 2048)}, rank=8)))
    manifest = _manifest(tmp_path, [good, bad], {"backend": "diffusers", "path": str(qwen_image_dir)})
    rc, out, seconds, mb, _ = _deep(manifest, tmp_path / "cache")
    assert rc == 2, out
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert problems == [f"{bad}: key transformer_blocks.0.attn.to_q: ShapeMismatchError: LoRA down has 2048 inputs "
                        "but module 'transformer_blocks.0.attn.to_q' takes 3072"], out
    assert seconds < 120, seconds  # ~4-13 s here; a bound for a hang, not a speed goal (the memory bound proves meta)
    assert mb < 2048, mb  # far below the ~40 GB of its bf16 weights


def _extract(path, bias_rows: int = 128, seed: int = 5) -> str:
    """A ComfyUI LoraSave-style extract for the tiny model: LoRA pairs, a norm ``.diff`` and a
    bias ``.diff_b`` (``bias_rows`` wrong: a diff that does not fit)."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"diffusion_model.{k}": v for k, v in peft_state_dict(random_layers(
        linear_shapes(meta_transformer(), ("transformer_blocks.0.attn.to_q",)), rank=2, seed=seed), prefix="").items()
        if not k.endswith(".alpha")}
    sd = {k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight"): v.half()
          for k, v in sd.items()}
    sd["diffusion_model.transformer_blocks.0.attn.norm_q.diff"] = torch.randn(32, generator=g).half()
    sd["diffusion_model.transformer_blocks.0.attn.to_q.diff_b"] = torch.randn(bias_rows, generator=g).half()
    return write_safetensors(path, sd)


def test_deep_binds_each_composition_once_diffs_included(tmp_path, monkeypatch):
    """Jobs' compositions, keyed as the worker keys them (content and strength, not list order),
    are each bound once as a whole, full-weight diffs and all; a diff that does not fit is named
    by its key, and the compositions holding that file are named with their jobs."""
    import lora_core.compose as compose
    import lora_core.inspection  # noqa: F401 - its per-target binds keep the real plan; the spy sees compositions
    from farm.deep_validate import deep_problems
    from jobs.manifest import load_manifest

    good = _tiny_lora(tmp_path / "good.safetensors", kohya=True)
    extract = _extract(tmp_path / "extract.safetensors")
    bad = _extract(tmp_path / "bad.safetensors", bias_rows=96, seed=6)
    loras = [[good], [good, extract], [extract, good], [{"uri": good, "strength": 0.5}, extract], [bad, good],
             [bad], [extract]]
    jobs = [{"id": f"j{i}", "prompt": "a cat", "seed": i, "loras": ls} for i, ls in enumerate(loras)]
    (tmp_path / "m.json").write_text(json.dumps({"model": {"backend": "tiny"}, "output": str(tmp_path / "out"),
                                                 "jobs": jobs}))
    binds: list[list[tuple[str, float, int]]] = []
    real_plan = compose.plan

    def spy(pairs, index, where=None):
        binds.append(sorted((os.path.basename(a.source), s, len(a.diffs)) for a, s in pairs))
        return real_plan(pairs, index, where)

    monkeypatch.setattr(compose, "plan", spy)
    problems, notes = deep_problems(load_manifest(str(tmp_path / "m.json")), cache_dir=str(tmp_path / "cache"))
    assert problems == [f"{bad}: key diffusion_model.transformer_blocks.0.attn.to_q.diff_b: ShapeMismatchError: "
                        "diff has shape (96,) but transformer_blocks.0.attn.to_q.bias takes (128,)"], problems
    assert sorted(binds) == sorted([[("good.safetensors", 1.0, 0)],
                                    [("extract.safetensors", 1.0, 2), ("good.safetensors", 1.0, 0)],
                                    [("extract.safetensors", 1.0, 2), ("good.safetensors", 0.5, 0)],
                                    [("extract.safetensors", 1.0, 2)]]), binds  # j1 and j2 are one composition
    assert len(notes) == 2, notes
    assert any(n.startswith(f"composition [{bad} x1 + {good} x1] (1 job(s): j4): cannot be composed: {bad}")
               for n in notes), notes
    assert any(n.startswith(f"composition [{bad} x1] (1 job(s): j5)") for n in notes), notes
    assert not (tmp_path / "out").exists()


def test_deep_names_a_diff_for_another_model_by_its_key(tmp_path):
    """A Flux (BFL-named) extract on the Qwen-Image tiny model: ``img_attn.qkv`` maps onto
    Qwen-Image's q/k/v, whose widths do not add up; ``single_blocks`` has no counterpart."""
    from farm.deep_validate import deep_problems
    from jobs.manifest import load_manifest

    flux = write_safetensors(tmp_path / "flux.safetensors", {
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.zeros(3 * 3072).half(),
        "diffusion_model.single_blocks.0.linear1.diff": torch.zeros(21504, 8).half()})
    problems, _ = deep_problems(load_manifest(_manifest(tmp_path, [flux])), cache_dir=str(tmp_path / "cache"))
    assert len(problems) == 2, problems
    assert any(p.startswith(f"{flux}: key diffusion_model.double_blocks.0.img_attn.qkv.diff_b: ShapeMismatchError: "
                            "diff has 9216 rows but the model's components add up to 384") for p in problems), problems
    assert any(p.startswith(f"{flux}: key diffusion_model.single_blocks.0.linear1.diff: TargetNotFoundError")
               for p in problems), problems


def test_a_composition_that_fails_only_as_a_whole_is_a_problem_naming_its_jobs(tmp_path, monkeypatch):
    """The guard for a composition of sound files that cannot be composed together. Today's
    plan has no such case (every file that binds alone binds beside others), so the plan is
    made to refuse one composition, as a future rule might: the line names the composition
    (files and strengths) and its jobs, the files are not listed as problems of their own, the
    other compositions pass, and `farm validate --deep` exits 2 without rendering."""
    import lora_core.compose as compose
    from farm.deep_validate import deep_problems
    from jobs.manifest import load_manifest
    from lora_core.errors import CorruptFileError

    good = _tiny_lora(tmp_path / "good.safetensors", kohya=True)
    other = _tiny_lora(tmp_path / "other.safetensors", seed=3)
    jobs = [{"id": f"j{i}", "prompt": "a cat", "seed": i, "loras": ls}
            for i, ls in enumerate([[good], [other], [good, other], [other, good]])]
    (tmp_path / "m.json").write_text(json.dumps({"model": {"backend": "tiny"}, "output": str(tmp_path / "out"),
                                                 "jobs": jobs}))
    real_plan = compose.plan

    def together_refused(pairs, index, where=None):
        if len(pairs) > 1:
            raise CorruptFileError("these two cannot share a module (file stand-in)")
        return real_plan(pairs, index, where)

    monkeypatch.setattr(compose, "plan", together_refused)
    problems, notes = deep_problems(load_manifest(str(tmp_path / "m.json")), cache_dir=str(tmp_path / "cache"))
    assert problems == [f"composition [{good} x1 + {other} x1] (2 job(s): j2, j3): CorruptFileError: "
                        "these two cannot share a module"], problems
    assert notes == []
    from farm.cli import main as farm_main

    monkeypatch.setenv("LORA_FARM_CACHE", str(tmp_path / "cache"))
    assert farm_main(["validate", str(tmp_path / "m.json"), "--deep"]) == 2
    assert not (tmp_path / "out").exists()


def test_deep_on_the_nunchaku_backend_binds_to_the_checkpoint_header(tmp_path):
    """nunchaku's transformer built on meta from its checkpoint's header (nunchaku never imported:
    a stand-in package that would record its import is on the path): fetch, checksum and header
    problems and, by key, the LoRA for another model and the packed-weight diffs; the good file
    and the extract whose diffs land on unquantized tensors are not named; exit 2, nothing rendered."""
    from tests.workers.test_nunchaku_meta import _extract, _good_lora, _other_model_lora, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "svdq-int4_r32-qwen-image.safetensors")
    good, extract, packed = _good_lora(tmp_path), _extract(tmp_path, packed=False), _extract(tmp_path, packed=True)
    other = _other_model_lora(tmp_path)
    bad_sum = _tiny_lora(tmp_path / "badsum.safetensors", seed=1)
    truncated = _tiny_lora(tmp_path / "truncated.safetensors", seed=2)
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) - 100])
    missing = str(tmp_path / "missing.safetensors")
    wrong_sha = hashlib.sha256(b"not this file").hexdigest()
    model = {"backend": "nunchaku", "path": checkpoint, "args": {"pipeline": str(tmp_path / "Qwen-Image")}}
    manifest = _manifest(tmp_path, [good, extract, packed, other, {"uri": bad_sum, "sha256": wrong_sha}, truncated,
                                    missing], model)
    fake = tmp_path / "site" / "nunchaku"
    fake.mkdir(parents=True)
    marker = tmp_path / "nunchaku-imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH", "")) if p)
    rc, out, _, _, _ = run_measured("from farm.cli import main",
                                    f"rc = main(['validate', {manifest!r}, '--deep']); "
                                    "rc = rc if 'nunchaku' not in sys.modules else 99",
                                    LORA_FARM_CACHE=str(tmp_path / "cache"), PYTHONPATH=path)
    assert rc == 2, out
    assert not marker.exists()
    assert "binding not checked" not in out
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert f"{manifest}: 9 LoRA problem(s):" in out, out
    assert any(p.startswith(f"{missing}: PermanentFetchError") for p in problems), out
    assert any(p.startswith(f"{bad_sum}: ChecksumMismatch") and wrong_sha in p for p in problems), out
    assert any(p.startswith(f"{truncated}: CorruptFileError") and "truncated" in p for p in problems), out
    b0 = "transformer_blocks.0"
    for key in (f"diffusion_model.{b0}.attn.to_q.diff", f"diffusion_model.{b0}.txt_mod.1.diff"):
        assert any(p.startswith(f"{packed}: key {key}: UnsupportedFormatError") and "quantized (packed)" in p
                   for p in problems), out
    for key, why in (("single_transformer_blocks.0.attn.to_q", "TargetNotFoundError"),
                     ("single_transformer_blocks.0.proj_mlp", "TargetNotFoundError"),
                     (f"{b0}.attn.to_v", "ShapeMismatchError: LoRA up rows 128..256 fall outside module "
                                         f"'{b0}.attn.to_qkv''s 192 outputs"),
                     (f"{b0}.img_mlp.net.2", "ShapeMismatchError: LoRA down has 512 inputs")):
        assert any(p.startswith(f"{other}: key {key}: {why}") for p in problems), out
    assert len(problems) == 9, out
    assert good not in out and extract not in out
    assert not (tmp_path / "out").exists()


def test_deep_names_a_nunchaku_checkpoint_it_cannot_build(tmp_path):
    """A checkpoint whose header its loader would not load is one model problem naming the file
    and the key; the LoRAs' own checks still run."""
    from farm.deep_validate import deep_problems
    from jobs.manifest import load_manifest
    from tests.workers.test_nunchaku_meta import checkpoint_metadata, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "r128.safetensors", metadata={
        **checkpoint_metadata(), "quantization_config": json.dumps({"rank": 128})})
    missing = str(tmp_path / "missing.safetensors")
    m = load_manifest(_manifest(tmp_path, [_tiny_lora(tmp_path / "good.safetensors"), missing],
                                {"backend": "nunchaku", "path": checkpoint}))
    problems, _ = deep_problems(m, cache_dir=str(tmp_path / "cache"))
    assert len(problems) == 2, problems
    assert problems[0].startswith('model {"backend": "nunchaku"'), problems
    assert problems[0].endswith(f"CheckpointError: {checkpoint}: key 'transformer_blocks.0.attn.add_qkv_proj.proj_down':"
                                " rank 32, but quantization_config says 128 (the loader builds its layers with that "
                                "rank)"), problems
    assert problems[1].startswith(f"{missing}: PermanentFetchError"), problems
