"""Tables, the RESULTS.md section and the bar chart of the compose benchmark."""
from __future__ import annotations

import os

from .common import write_section

HERE = os.path.dirname(os.path.abspath(__file__))
PLOT = os.path.join(HERE, "compose_cpu.png")
SECTION = "## Compose (LoRA switch cost)"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _yn(x) -> str:
    return "-" if x is None else ("yes" if x else "**no**")


def label(r: dict) -> str:
    return f"{r['mode']} {r['scenario']} r{r['rank']}x{r['loras']}"


def table(result: dict) -> str:
    lines = [
        "| scenario | LoRAs (rank x n) | N | ours ms/block | peer | peer ms/block | floor ms/block | ours/peer "
        "| ours/floor | <= 1/3 peer | <= 3x floor | check |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in result["scenarios"].values():
        peer = "seed loader" if r["mode"] == "svdq" else "diffusers+PEFT"
        lines.append(
            f"| {r['mode']} {r['scenario']} | r{r['rank']} x {r['loras']} | {len(r['ours_samples'])} "
            f"| {_ms(r['per_block']['ours_s'])} | {peer} "
            f"| {_ms(r['per_block']['peer_s'])} | {_ms(r['per_block']['floor_s'])} | {_x(r['ours_over_peer'])} "
            f"| {_x(r['ours_over_floor'])} | {_yn(r['le_third_of_peer'])} | {_yn(r['le_3x_floor'])} "
            f"| {'ok' if r['check']['ok'] else '**FAILED**'} |"
        )
    return "\n".join(lines)


def per_mode(result: dict) -> str:
    out = []
    for mode in ("merge", "lowrank", "svdq"):
        warm = [r for r in result["scenarios"].values() if r["mode"] == mode and r["scenario"] == "warm switch"]
        if warm:
            a = sum(bool(r["le_third_of_peer"]) for r in warm)
            b = sum(bool(r["le_3x_floor"]) for r in warm)
            out.append(f"{mode}: <= 1/3 peer in {a}/{len(warm)}, <= 3x floor in {b}/{len(warm)}")
    return "; ".join(out)


def new_composition_note(result: dict) -> str:
    """The first switch to a composition (not a target row): where it stands, from the data."""
    parts = []
    for mode, why in (("lowrank", "PEFT's `set_adapters` does no tensor work; ours writes the scaled factors "
                                  "into new tensors in the module's dtype and checks them, once per composition"),
                      ("svdq", "the plan builds block-diagonal up factors for the fused qkv, and the packed branch "
                               "is a new tensor, base tiles included")):
        rows = [r for r in result["scenarios"].values() if r["mode"] == mode and r["scenario"] == "new composition"]
        if rows:
            peer = [r["ours_over_peer"] for r in rows]
            floor = [r["ours_over_floor"] for r in rows if r["ours_over_floor"] is not None]
            parts.append(f"{mode} {min(peer):.2f}-{max(peer):.2f}x the peer and {min(floor):.1f}-{max(floor):.1f}x "
                         f"the floor ({why})")
    if not parts:
        return ""
    steady = [r for r in result["scenarios"].values() if "steady_allocator" in r and r["scenario"] == "new composition"]
    again = ""
    if steady:
        ratios = [r["steady_allocator"]["ours_s"] / r["steady_allocator"]["peer_s"] for r in steady]
        ms = ", ".join(f"r{r['rank']}x{r['loras']} {_ms(r['steady_allocator']['ours_s'] / r['blocks'])} vs "
                       f"{_ms(r['steady_allocator']['peer_s'] / r['blocks'])}" for r in steady)
        own = [r["steady_allocator"]["ours_s"] / r["ours_s"] for r in steady]
        again = (" The svdq rows were measured again at the end of the same run with glibc's malloc thresholds "
                 "fixed (`compose_setup.steady_allocator`: freed memory is reused instead of going back to the "
                 "kernel and being faulted in, zeroed, on the next allocation, as a GPU's caching allocator "
                 "does), to see how much of a new composition is fresh pages (ours keeps the branches it built, "
                 f"so its next ones are new memory): ours/peer {min(ratios):.2f}-{max(ratios):.2f}, ours "
                 f"{min(own):.2f}-{max(own):.2f}x its default-allocator time (ms/block, ours vs seed loader: {ms}).")
    return ("*New composition* rows (the first switch to a composition; not in the targets, which are about the "
            "warm switch): " + "; ".join(parts) + "." + again)


def floor_table(result: dict) -> str:
    lines = [
        "| rank x n | copy touched weights | B@A fp32 (applies) | B@A bf16 (extrapolated) | copy LoRA bytes (low-rank) |",
        "|---|---:|---:|---:|---:|",
    ]
    sc = result["scenarios"]
    b = result["settings"]["blocks"]
    for k, r in sc.items():
        if r["mode"] == "merge" and r["scenario"] == "warm switch":
            lr = sc.get(k.replace("merge/", "lowrank/"))
            fp = r["floor_parts"]
            lines.append(
                f"| r{r['rank']} x {r['loras']} | {_ms(fp['copy_weights_s'] / b)} | {_ms(fp['mm_fp32_s'] / b)} "
                f"| {_ms(fp['mm_bf16_s_extrapolated'] / b)} "
                f"| {_ms(lr['floor_parts']['copy_lora_bytes_s'] / b) if lr else '-'} |"
            )
    return "\n".join(lines)


def svdq_floor_table(result: dict) -> str:
    """The svdq first switch against the issue's floor (copy the LoRA bytes) and against writing
    the packed branches it leaves in the model (every SVDQ factor of the composition, base tiles
    included: nunchaku's kernel reads each as one tensor, so any method writes these bytes)."""
    rows = [r for r in result["scenarios"].values() if r["mode"] == "svdq" and r["scenario"] == "new composition"
            and "write_branch_s" in r["floor_parts"]]
    if not rows:
        return ""
    b = result["settings"]["blocks"]
    lines = [
        "SVDQ first switch (ms/block) against two floors, same run, buffers allocated once: copying the LoRA "
        "tensors' bytes (the issue's floor and the target's) and writing the packed branches the switch leaves "
        "in the model (every SVDQ factor of the composition, base tiles and the fused qkv's block-diagonal zeros "
        "included: nunchaku's kernel reads each factor as one tensor, so any method writes these bytes).",
        "",
        "| rank x n | ours | copy LoRA bytes (MB) | ours / it | write the branches (MB) | ours / it |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fp = r["floor_parts"]
        lines.append(
            f"| r{r['rank']} x {r['loras']} | {_ms(r['ours_s'] / b)} | {_ms(fp['copy_lora_bytes_s'] / b)} "
            f"({fp['lora_bytes'] / b / 1e6:.1f}) | {r['ours_s'] / fp['copy_lora_bytes_s']:.1f}x "
            f"| {_ms(fp['write_branch_s'] / b)} ({fp['branch_bytes'] / b / 1e6:.1f}) "
            f"| {r['ours_s'] / fp['write_branch_s']:.1f}x |")
    return "\n".join(lines)


def profile_table(result: dict) -> str:
    profiles = result.get("profile_warm_merge")
    if not profiles:
        return "(not profiled in this run)"
    if "top" in profiles:  # one profile, as older runs wrote it
        profiles = {"largest rank x composition": profiles}
    blocks = result["settings"]["blocks"]
    out = []
    for cell, p in profiles.items():
        lines = [f"One warm merge switch, {cell} ({blocks} blocks; the timed sample itself), "
                 f"{p['wall_s']:.2f} s wall under cProfile:", "",
                 "| function | calls | own s | share |", "|---|---:|---:|---:|"]
        for t in p["top"][:8]:
            lines.append(f"| `{t['function']}` | {t['calls']} | {t['own_s']:.3f} | {100 * t['own_s'] / p['wall_s']:.0f}% |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _s(x) -> str:
    return "-" if x is None else (f"{x:.3g}" if x < 1000 else f"{x:,.0f}")


def images_tables(result: dict) -> str:
    """The switch + N images cells: the terms per composition, then the totals per N."""
    im = result.get("images")
    if not im:
        return "(not run: `--modes` without `images`)"
    b, st, base = result["settings"]["blocks"], im["settings"], im["base_step"]
    terms = ["| LoRAs | switch ms/block: ours merge / ours lowrank / PEFT fused / PEFT unfused | branch s/step/block: "
             "ours / PEFT (CPU time) | crossover N | per-token spread (CPU) | branch check |", "|---|---|---|---:|---|---|"]
    totals = ["| LoRAs | N | ours merge | ours lowrank | ours auto | PEFT fused | PEFT unfused | auto - best PEFT "
              "| auto / best PEFT | cheaper (ours) | auto right | ours <= PEFT (merge, lowrank, auto) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for cell, c in im["cells"].items():
        sw, br, cpu = c["switch_s"], c["branch_per_step_s"], c["branch_per_step_cpu_s"]
        terms.append(
            f"| {cell} | {' / '.join(_ms(sw[k] / b) for k in ('ours merge', 'ours lowrank', 'PEFT fused', 'PEFT unfused'))} "
            f"| {_s(br['ours'] / b)} / {_s(br['peft'] / b)} ({_s(cpu['ours'] / b)} / {_s(cpu['peft'] / b)}) "
            f"| {c['crossover_images']:.2g} | {'ok' if c['scaling_ok'] else '**over tolerance**'} "
            f"| {'ok' if c['check']['ok'] else '**FAILED**'} |")
        for n, v in c["by_images"].items():
            t = v["total_s"]
            best = min(t["PEFT fused"], t["PEFT unfused"])
            yn = ", ".join(_yn(v[k]) for k in ("ours_merge_le_peft_fused", "ours_lowrank_le_peft_unfused",
                                               "ours_auto_le_best_peft"))
            totals.append(
                f"| {cell} | {n} | {_s(t['ours merge'] / b)} | {_s(t['ours lowrank'] / b)} "
                f"| {_s(t['ours auto'] / b)} ({v['auto_mode']}) | {_s(t['PEFT fused'] / b)} | {_s(t['PEFT unfused'] / b)} "
                f"| {(t['ours auto'] - best) / b:+.3g} | {t['ours auto'] / best:.4f} | {v['cheaper_mode']} "
                f"| {_yn(v['auto_ok'])} | {yn} |")
    tg = im["targets"]
    fc = "".join(f" Cross-check of the stubbed branch time on {cell} ({f['samples']} samples, CPU time, 1/{f['divisor']} "
                 f"of the tokens): (forward with branches - base forward) / branch = "
                 f"{f['ours_forward_minus_base_over_branch']:.2f} ours, {f['peft_forward_minus_base_over_branch']:.2f} PEFT"
                 + (f"; the stubbed time per token there over the one the totals use: "
                    f"{f['ours_per_token_at_forward_over_used']:.2f} ours, {f['peft_per_token_at_forward_over_used']:.2f} PEFT "
                    "(each call's fixed overhead, had the branches been timed at that count)."
                    if "ours_per_token_at_forward_over_used" in f else ".")
                 for cell, f in ((k, c["forward_check"]) for k, c in im["cells"].items() if c.get("forward_check")))
    cpu = base["cpu"]
    return "\n".join([
        f"Image: 1024x1024 = {st['image_tokens']} image tokens + {st['text_tokens']} text tokens, {st['steps']} steps "
        "(one transformer forward each). Base step (= the merged model's): "
        f"{_s(base['full_s'] / b)} s/block wall, {_s(cpu['full_s'] / b)} s/block CPU time "
        f"(attention core at the full count {_s(base['attention_full_s'] / b)} s/block wall); timed at 1/"
        f"{' and 1/'.join(str(d) for d in st['step_divisors'])} of the tokens and scaled from the larger count, "
        f"per-token spread between the two {cpu['per_token_spread']:.2f} CPU ({base['per_token_spread']:.2f} wall; "
        f"tolerance {1 + st['scaling_tolerance']:.2f}): {'holds' if base['scaling_ok'] else '**over tolerance**'}."
        + (f" The branches are timed at 1/{' and 1/'.join(str(d) for d in st['branch_divisors'])} of the tokens, "
           "scaled from the larger count." if "branch_divisors" in st else "")
        + fc,
        "",
        "\n".join(terms),
        "",
        ("Every crossover N is below 1: merging beats our branch from the first image. "
         if all(c["crossover_images"] < 1 for c in im["cells"].values()) else
         "Merging beats our branch for N above the crossover. ")
        + "Totals, seconds per block for switch + N images (x60 blocks for the full model; wall time, the clock "
        "of the switch rows):",
        "",
        "\n".join(totals),
        "",
        f"Targets: ours merge <= PEFT fused at every N: **{'met' if tg['ours_merge_le_peft_fused_all'] else 'not met'}**; "
        f"ours lowrank <= PEFT unfused: **{'met' if tg['ours_lowrank_le_peft_unfused_all'] else 'not met'}**; "
        f"ours auto <= PEFT's cheaper mode: **{'met' if tg['ours_auto_le_best_peft_all'] else 'not met'}**; "
        f"auto picks the cheaper mode (or one within its {st['hysteresis']:.0%} hysteresis): "
        f"**{'yes' if tg['auto_picks_cheaper_all'] else 'no'}**; scaling within tolerance: "
        f"{'yes' if tg['scaling_ok_all'] and base['scaling_ok'] else '**no**'}; every module ran its branch in the "
        f"timed passes: {'yes' if tg['branch_checks_ok'] else '**no**'}.",
    ])


def section(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    tg = result["targets"]
    checks = [r for r in result["scenarios"].values() if r["mode"] == "merge" and r["scenario"] == "restore"]
    drift = max((r["check"].get("peft_max_abs_drift_after_unfuse", 0.0) for r in checks), default=0.0)
    parts = [
        SECTION,
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}, "
        f"diffusers {m['diffusers']}, peft {m['peft']}; torch threads: {s['threads']}"
        + (f", THP_MEM_ALLOC_ENABLE={m['THP_MEM_ALLOC_ENABLE']}" if m.get("THP_MEM_ALLOC_ENABLE") else "") + "  ",
        f"Model: diffusers `QwenImageTransformer2DModel` at its installed defaults but {s['blocks']} blocks "
        f"(inner dim {s['model']['num_attention_heads'] * s['model']['attention_head_dim']} = "
        f"{s['model']['num_attention_heads']} heads x {s['model']['attention_head_dim']}, MLP 4x, "
        f"joint_attention_dim {s['model']['joint_attention_dim']}), bf16, random weights. LoRAs: PEFT files "
        "(`transformer.<module>.lora_A.weight` + `.alpha`, alpha = rank/2) on the 14 attention/MLP/modulation "
        "linears of every block. Each cell is the median of N samples (`--repeats`, default 3; the dense-merge "
        "cells `--merge-repeats`, default the same). This is a shared 2-core VM: wall times of one configuration "
        "move by up to ~2x between runs, for ours and the peer alike, which is why each is measured beside the "
        "other in turn. Figures are **milliseconds per transformer "
        f"block** (x60 for the full model). Whole run: {result['total_s']:.0f} s; load average "
        f"{m.get('loadavg_1m_start', '?')} at start, {m.get('loadavg_1m_end', '?')} at end.",
        "",
        "Merge cycle per configuration: base -> X from the files (*cold*: ours `load_adapter` + `ComposedModel` "
        "`want`/`ensure`; PEFT `lora_state_dict` + `load_lora_into_transformer` per file, as "
        "`pipe.load_lora_weights` does, + `set_adapters` + `fuse_lora`) -> Y with every adapter in memory "
        "(*warm switch*: ours `want`/`ensure`, i.e. plan + `lora_core.switch`, which rewrites every module both "
        "compositions touch from its kept original in cache-sized blocks of rows, with no restore pass; PEFT "
        "`unfuse_lora` + `set_adapters` + `fuse_lora`) -> base (*restore*: ours `ComposedModel.reset`, a copy "
        "from the kept originals; PEFT `unfuse_lora`, timed inside its warm switch). X = 1 or 3 LoRAs at "
        "strengths 0.8/0.6/0.5, Y = 1 or 3 others at 0.7/0.9/0.4. Low-rank: *new composition* = the first switch "
        "to Y (plan the branch tensors straight in the module's dtype, check them, swap them onto the hooks "
        "already in place); *warm switch* "
        "= X <-> Y once both are held (ours keeps prepared branch tensors per composition, up to "
        "`branch_cache_mb`, and swaps them; PEFT's `set_adapters` does the same work either way). SVDQ: the same "
        "two rows (ours keeps the packed branches of held compositions within the same budget; the seed "
        "loader repacks every time).",
        "",
        table(result),
        "",
        f"Targets (warm switch <= 1/3 of the peer and <= 3x the floor, every configuration): {per_mode(result)}. Overall: "
        f"<= 1/3 peer: **{'met' if tg['warm_switch_le_third_of_peer_all'] else 'not met'}**; "
        f"<= 3x floor: **{'met' if tg['warm_switch_le_3x_floor_all'] else 'not met'}**. "
        f"All correctness checks: {'passed' if tg['all_checks_ok'] else '**FAILED**'}.",
        "",
        new_composition_note(result),
        "",
        "Peers: *merge*: diffusers + PEFT on a copy of the same model and the same files; warm switch = "
        "`unfuse_lora` + `set_adapters` + `fuse_lora` with every adapter already loaded; restore = `unfuse_lora` "
        f"(a subtraction: it left up to {drift:.2g} max abs error in the bf16 weights here; ours is bit-exact). "
        "*lowrank*: PEFT unfused, switch = `set_adapters` only (flags and scales, no tensor work). *svdq*: the seed "
        "loader's approach, reimplemented in `benchmarks/compose_svdq.py`: unpack the whole packed low-rank branch, "
        "concatenate and repack on every reset and apply, on `SVDQW4A4Linear` stand-ins of Qwen-Image's "
        "nunchaku shapes (to_qkv/add_qkv_proj 3072->9216, to_out/to_add_out 3072->3072, MLP 3072<->12288, "
        "base rank 32, bf16; the same LoRAs without the modulation layers). The peer packs and unpacks with "
        "`lora_core.nunchaku`'s functions, so both sides gain from their speed; what differs is the work: ours "
        "packs only the LoRA and appends its tiles to the base's packed tiles, and restores by swapping the "
        "original Parameters back.",
        "",
        "Floors (ms/block), measured in the same run with buffers allocated once: a merge must at least write every "
        "touched weight and form B@A; our merge (and PEFT's on CPU) multiplies in fp32, so the fp32 product is the "
        "one that applies. Cold adds reading the files' bytes (page cache). Low-rank and svdq: copying the LoRA "
        "tensors' bytes (for svdq an optimistic floor: a LoRA on q, k and v lands in the fused to_qkv as a "
        "block-diagonal up factor, 3x the file's bytes, and the packed branch is rewritten whole).",
        "",
        floor_table(result),
        "",
        svdq_floor_table(result),
        "",
        "### Switch + N images at 1024x1024",
        "",
        "What a farm pays for a composition it never held: the first switch (adapters in memory) + N images. "
        "Merged (ours `merge`, PEFT `fuse_lora`) a step costs the base model's; with runtime branches (ours "
        "`lowrank`, PEFT unfused after `set_adapters`) every step also runs the branches. The switch terms are "
        "the rows above (merge warm switch; low-rank *new composition*; PEFT `unfuse_lora` + `set_adapters` + "
        "`fuse_lora`, and `set_adapters`); *ours auto* is what `workers.automode.choose` picks from these measured "
        "terms (starting from merge); the crossover N = (merge switch - branch switch) / (branch cost per image): "
        "merging beats our branch above it. Branch cost per step: every LoRA-covered module of the blocks called "
        "on an input of its real shape with its base linear stubbed to return a ready output, so only the branch "
        "is timed (ours: the ComposedModel's hook, one pair at the composition's total rank; PEFT: "
        "`lora.Linear.forward`, one pair per adapter, then the scaling). See `benchmarks/compose_images.py`.",
        "",
        images_tables(result),
        "",
        "Profile of our warm merge switch (cProfile, own time):",
        "",
        profile_table(result),
        "",
    ]
    return "\n".join(parts)


def write_results(result: dict) -> None:
    write_section(section(result))


def write_plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result["scenarios"].values())
    labels = [label(r) for r in rows]
    fig, ax = plt.subplots(figsize=(max(10, 0.55 * len(rows)), 5.5))
    w = 0.28
    xs = range(len(rows))
    for j, (k, name, color) in enumerate((("ours_s", "ours", "#1f77b4"), ("peer_s", "peer (PEFT / seed loader)", "#ff7f0e"),
                                          ("floor_s", "floor", "#7f7f7f"))):
        vals = [(r["per_block"][k] or 0) * 1e3 for r in rows]
        ax.bar([x + (j - 1) * w for x in xs], vals, w, label=name, color=color)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("ms per transformer block (log)")
    m, s = result["machine"], result["settings"]
    ax.set_title(f"LoRA switch cost, Qwen-Image width, bf16, {s['threads']} thread(s), {m['cpu']}, torch {m['torch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
