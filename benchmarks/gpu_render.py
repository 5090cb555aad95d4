"""benchmarks/gpu.py's render step (one forward of the whole transformer), its checks, and the report."""
from __future__ import annotations

import platform
import statistics

import torch
from torch import nn

from . import compose_setup as S
from .common import cpu_name


def forward_ready(model: nn.Module) -> nn.Module:
    """``compose_setup.build_model`` fills the parameters only; the RoPE tables (plain tensor
    attributes of ``pos_embed``, built on meta with the rest) are made again, a few MB."""
    pe = model.pos_embed
    with torch.device("cpu"):
        model.pos_embed = type(pe)(theta=pe.theta, axes_dim=list(pe.axes_dim), scale_rope=pe.scale_rope)
    left = [f"{n}.{k}" for n, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor) and v.is_meta]
    left += [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors still on the meta device after the build: {left[:5]}")
    return model


def inputs(config, resolution: int, txt_tokens: int, device: torch.device, seed: int = 0) -> dict:
    """What ``QwenImagePipeline`` hands the transformer for one step at ``resolution`` squared:
    packed latents (VAE /8, 2x2 patches: 4096 tokens at 1024), prompt embeddings and mask."""
    side = resolution // 8 // config["patch_size"]
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, side * side, config["in_channels"], generator=g, device=device).to(S.DTYPE)
    txt = torch.randn(1, txt_tokens, config["joint_attention_dim"], generator=g, device=device).to(S.DTYPE)
    return {"hidden_states": x, "encoder_hidden_states": txt,
            "encoder_hidden_states_mask": torch.ones(1, txt_tokens, dtype=torch.long, device=device),
            "timestep": torch.full((1,), 0.5, dtype=S.DTYPE, device=device), "img_shapes": [[(1, side, side)]],
            "return_dict": False}


def probes(model: nn.Module) -> list[str]:
    """Where the check reads the LoRA's effect: the image MLP of the first and of the last
    block (the final output barely shows it: random gates damp every block's contribution)."""
    return [f"transformer_blocks.{i}.img_mlp" for i in sorted({0, len(model.transformer_blocks) - 1})]


def step(model: nn.Module, args: dict, repeats: int) -> dict:
    """One untimed forward (warm-up; its output and the probes' kept), then ``repeats`` timed ones."""
    got: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: got.setdefault(n, o.clone()))
             for n in probes(model)]
    try:
        y = model(**args)[0]
    finally:
        for h in hooks:
            h.remove()
    samples = [S.timed(lambda: model(**args)) for _ in range(repeats)]
    return {"y": y, "probes": got, "samples": samples, "s": statistics.median(samples) if samples else None}


def row(variant: str, rank: int, n: int, blocks: int, res: dict, base: dict | None = None) -> dict:
    return {"variant": variant, "rank": rank, "loras": n, "blocks": blocks, "step_s": res["s"],
            "samples": res["samples"], "over_base": res["s"] / base["s"] if base and base["s"] else None}


def check(rank: int, n: int, base: dict, again: dict, ours: dict, peft: dict) -> dict:
    """Output and probes bit-identical to the base after our restore; all finite; at each
    probe ours and PEFT's differ by under a tenth of the LoRA's effect there (plus the bf16
    rounding of the value: 2^-7 of its largest), which is far above that rounding."""
    bit_exact = torch.equal(base["y"], again["y"]) and all(torch.equal(base["probes"][k], again["probes"][k])
                                                           for k in base["probes"])
    finite = all(bool(torch.isfinite(r["y"]).all()) for r in (base, ours, peft))
    at = {}
    for k, b in base["probes"].items():
        b, o, p = b.float(), ours["probes"][k].float(), peft["probes"][k].float()
        term = float((p - b).abs().max())
        at[k] = {"lora_effect": term, "rounding": 2**-7 * float(p.abs().max()),
                 "ours_vs_peft": float((o - p).abs().max()) / (term + 2**-7 * float(p.abs().max()))}
    applied = all(v["lora_effect"] > 4 * v["rounding"] for v in at.values())
    agree = all(v["ours_vs_peft"] < 0.1 for v in at.values())
    return {"composition": f"r{rank}x{n}", "ok": bit_exact and finite and applied and agree,
            "base_bit_exact_after_restore": bit_exact, "finite": finite, "lora_effect_above_rounding": applied,
            "probes": at, "worst_ours_vs_peft": max(v["ours_vs_peft"] for v in at.values())}


def device_info(device: torch.device) -> dict:
    import diffusers
    import peft

    info = {"device": str(device), "cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def render_table(render: dict) -> str:
    tok = render.get("tokens", {})
    lines = [f"One render step: a forward of all {render['blocks']} blocks, {tok.get('image')} image + "
             f"{tok.get('text')} text tokens ({render['blocks_why']}).", "",
             "| variant | LoRAs (rank x n) | N | ms / step | x base |", "|---|---|---:|---:|---:|"]
    for r in render["rows"]:
        loras = "-" if not r["loras"] else f"r{r['rank']} x {r['loras']}"
        over = "-" if r["over_base"] is None else f"{r['over_base']:.3f}"
        lines.append(f"| {r['variant']} | {loras} | {len(r['samples'])} | {_ms(r['step_s'])} | {over} |")
    for c in render["checks"]:
        lines.append(f"\n{c['composition']}: base bit-exact after our restore: {c['base_bit_exact_after_restore']}; "
                     f"ours vs PEFT at most {c['worst_ours_vs_peft']:.3f} of the LoRA's effect; "
                     f"{'ok' if c['ok'] else '**FAILED**'}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    from .compose_report import table

    d = result["device"]
    where = d.get("gpu", d["cpu"])
    out = [f"# GPU benchmark ({result['preset']} preset)", "",
           f"`{result['command']}` on {where} ({d['device']}; torch {d['torch']}, diffusers {d['diffusers']}, "
           f"peft {d['peft']}); timer: {result['timer']}; {result['total_s']:.0f} s in all; adapters "
           f"{result['adapters']}.", ""]
    if "render" in result:
        out += [render_table(result["render"]), ""]
    if result["scenarios"]:
        out += [f"LoRA switch, {result.get('switch_blocks')} blocks ({result.get('switch_blocks_why')}); "
                "ms per block:", "", table(result), ""]
    for s in result["skipped"]:
        out.append(f"- skipped {s['cell']}: {s['why']}")
    if "aborted" in result:
        out.append(f"- **aborted**: {result['aborted']}")
    out += ["", f"All checks {'passed' if result['all_checks_ok'] else '**did not pass**'}."]
    return "\n".join(out) + "\n"
