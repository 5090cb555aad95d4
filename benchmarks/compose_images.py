"""Switch + N images: what a farm pays to render N images at a composition it never held,
ours in each mode against diffusers + PEFT, on the compose benchmark's blocks.

    total(mode, N) = first switch to the composition + N * steps * (base step + branch per step)

Merged (ours ``merge``, PEFT ``fuse_lora``) a step costs the base model's; with runtime
branches (ours ``lowrank``, PEFT unfused with ``set_adapters``) every step also runs the
branches. The switch seconds come from the same run's rows (merge warm switch: the
adapters are in memory, the composition is new; low-rank *new composition*; PEFT's
``unfuse_lora`` + ``set_adapters`` + ``fuse_lora`` and ``set_adapters``). ``auto`` is
``workers.automode.choose`` fed the measured terms.

A 1024x1024 image is 4096 image tokens in Qwen-Image (VAE /8 -> 128x128 latents, 2x2
patches -> 64x64), with ``--text-tokens`` prompt tokens (default 128: the pipeline pads to
the longest prompt, up to 512). Steps per image: ``--steps`` (default 50, Qwen-Image's
``num_inference_steps``), one transformer forward each (no negative prompt, so no true CFG).

On this CPU a bf16 step of the 2 blocks at 4224 tokens takes minutes, so both terms are
timed at 1/``d`` of the tokens for two ``--step-divisors`` d (image and text counts both
divided by d) and scaled to the full count from the larger one; the per-token cost at
the two counts is reported, and the scaling is flagged when they differ by more than
``SCALING_TOL``, judged on this process's CPU time (the shared machine's load moves wall
time by 2-5x; the totals use wall time, the clock of the switch rows, with CPU time beside):

* base step: the blocks' forward (random weights, real RoPE); attention's T^2 core does
  not scale with tokens, so it is taken out (torch SDPA, all heads, at the small count)
  and measured at the full count on one head (heads are independent) x heads x blocks;
* branch per step: every covered module called on an input of its real shape (image
  stream, text stream, or ``temb`` for the modulation linears) with the base linear
  stubbed to return a ready output, so what is timed is the branch alone, at 1/``d`` of
  the tokens for the two ``BRANCH_DIVISORS`` (default 1/2 and the full count itself: a
  branch is a few percent of a step, so the full count costs little; at the step divisors'
  32-64 image tokens each call's fixed overhead, larger for PEFT's layer, was scaled up
  64-128x, and below half the count the per-token cost still moves with the count, up to
  1.9x between 1/8 and 1/4, as the activations outgrow the caches): ours, the
  ComposedModel's forward hook (one pair at the composition's total rank, strengths
  folded in); PEFT, its ``lora.Linear.forward`` around the stubbed ``base_layer`` (one
  pair per adapter, then the scaling). Cross-check on the largest composition: the real
  forward with branches minus the base forward, at the smaller count.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import Sequence

import torch
from torch import nn

from workers.automode import choose
from workers.wrapper import ComposedModel

from . import compose_setup as S
from .compose_svdq import Backend

IMAGE_TOKENS = 4096  # 1024x1024
TEXT_TOKENS = 128
STEPS = 50
IMAGES = (1, 4, 16)
DIVISORS = (128, 64)
BRANCH_DIVISORS = (2, 1)
SCALING_TOL = 0.15  # per-token cost at the two counts within 15%
HYSTERESIS = inspect.signature(choose).parameters["hysteresis"].default


def stream(name: str) -> str:
    """Which tokens a covered module sees: the image stream, the text stream or ``temb``."""
    if name.endswith("mod.1"):
        return "temb"
    leaf = name.split(".", 2)[2]
    return "txt" if leaf.startswith(("attn.add_", "attn.to_add_out", "txt_")) else "img"


def grid(tokens: int) -> tuple[int, int]:
    """(h, w) patches with h * w = tokens (a power of two), as square as it goes."""
    h = 2 ** (int(math.log2(tokens)) // 2)
    return h, tokens // h


class Steps:
    """The blocks' inputs at the reduced token counts and the base step's cost."""

    def __init__(self, model: nn.Module, divisors: Sequence[int], text_tokens: int, seed: int = 0):
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

        for d in divisors:
            if IMAGE_TOKENS % d or text_tokens % d or IMAGE_TOKENS // d < 1:
                raise ValueError(f"--step-divisors: {d} must divide {IMAGE_TOKENS} image tokens and "
                                 f"--text-tokens {text_tokens}")
        cfg = model.config
        self.model, self.divisors, self.text_tokens = model, list(divisors), text_tokens
        self.full = IMAGE_TOKENS + text_tokens
        self.heads, self.head_dim, self.blocks = cfg.num_attention_heads, cfg.attention_head_dim, len(model.transformer_blocks)
        dim = self.heads * self.head_dim
        rope = QwenEmbedRope(theta=10000, axes_dim=list(cfg.axes_dims_rope), scale_rope=True)
        g = torch.Generator().manual_seed(seed)
        self.device = dev = next(model.parameters()).device
        self.inputs, self.tokens = {}, {}
        for d in divisors:
            t_img, t_txt = IMAGE_TOKENS // d, text_tokens // d
            self.tokens[d] = {"img": t_img, "txt": t_txt, "temb": 1}
            self.inputs[d] = (torch.randn(1, t_img, dim, generator=g).to(dev, S.DTYPE),
                              torch.randn(1, t_txt, dim, generator=g).to(dev, S.DTYPE),
                              torch.randn(1, dim, generator=g).to(dev, S.DTYPE),
                              rope.to(dev)([(1, *grid(t_img))], max_txt_seq_len=t_txt, device=dev))

    def forward(self, d: int, model: nn.Module | None = None) -> None:
        """One step of the blocks at 1/d of the tokens (``model``: a copy with branches, same blocks)."""
        hs, ehs, temb, rot = self.inputs[d]
        with torch.no_grad():
            for b in (model or self.model).transformer_blocks:
                ehs, hs = b(hidden_states=hs, encoder_hidden_states=ehs, encoder_hidden_states_mask=None, temb=temb,
                            image_rotary_emb=rot)

    def attention(self, tokens: int, heads: int, times: int) -> dict:
        """The attention core (SDPA, bf16) over ``heads`` heads at ``tokens``, times ``times``."""
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, heads, tokens, self.head_dim, generator=g).to(self.device, S.DTYPE) for _ in range(3))
        with torch.no_grad():
            t = clocked(lambda: nn.functional.scaled_dot_product_attention(q, k, v))
        return {c: x * times for c, x in t.items()}

    def fixed(self) -> dict:
        """What does not grow with tokens: the blocks' modulation linears on ``temb``."""
        temb = self.inputs[self.divisors[0]][2]
        with torch.no_grad():
            return clocked(lambda: [(b.img_mod(temb), b.txt_mod(temb)) for b in self.model.transformer_blocks])

    def base(self, repeats: int) -> dict:
        """The base step (= a merged model's step) at the full count, from the reduced counts:
        (forward - attention core - modulation) x d + attention core at the full count + modulation."""
        fwd = {d: [] for d in self.divisors}
        attn = {d: [] for d in self.divisors}
        attn_full, fixed = [], []
        self.forward(self.divisors[0])  # first touch of the activations
        for _ in range(repeats):
            for d in self.divisors:
                fwd[d].append(clocked(lambda: self.forward(d)))
                attn[d].append(self.attention(self.full // d, self.heads, self.blocks))
            attn_full.append(self.attention(self.full, 1, self.heads * self.blocks))
            fixed.append(self.fixed())

        def compute(clock: str) -> dict:
            a_full, fx = med_of(attn_full, clock), med_of(fixed, clock)
            rest = {d: med_of(fwd[d], clock) - med_of(attn[d], clock) - fx for d in self.divisors}
            out = scaled(rest, self.full, self.divisors, fixed=fx + a_full)
            out.update(forward_s={d: med_of(v, clock) for d, v in fwd.items()}, attention_full_s=a_full,
                       attention_s={d: med_of(v, clock) for d, v in attn.items()}, modulation_s=fx)
            return out

        return dict(two_clocks(compute), samples={"forward": fwd, "attention": attn, "attention_full": attn_full,
                                                  "modulation": fixed})


# ---- clocks and scaling -------------------------------------------------------------------
def clocked(fn) -> dict:
    """Wall seconds of ``fn`` (``compose_setup.timed``: the benchmark's timer) and this
    process's CPU seconds (one torch thread: the work runs here)."""
    c = time.process_time()
    w = S.timed(fn)
    return {"wall": w, "cpu": time.process_time() - c}


def med_of(samples: Sequence[dict], clock: str) -> float:
    return S.med([x[clock] for x in samples])


def two_clocks(compute) -> dict:
    """``compute(clock)`` on wall time (what the totals use: the clock of the switch rows) with
    the CPU-time figures beside it; the scaling is judged on CPU time, our own work, which
    the shared machine's load moves far less than wall time."""
    out, cpu = compute("wall"), compute("cpu")
    return dict(out, wall_scaling_ok=out["scaling_ok"], scaling_ok=cpu["scaling_ok"], cpu=cpu)


def scaled(at: dict, full: int, divisors: Sequence[int], fixed: float = 0.0) -> dict:
    """Seconds at 1/d of the tokens -> the full count, from the larger count (smallest d),
    plus ``fixed`` (what does not scale); with the per-token costs at the counts and
    whether they agree."""
    per_token = {d: at[d] / (full / d) for d in divisors}
    lo, hi = min(per_token.values()), max(per_token.values())
    ratio = hi / lo if lo > 0 else math.inf
    d = min(divisors)
    return {"at_s": dict(at), "per_token_s": per_token, "per_token_spread": ratio,
            "scaling_ok": ratio <= 1 + SCALING_TOL, "fixed_s": fixed, "full_s": at[d] * d + fixed}


# ---- the branches' own cost per step --------------------------------------------------------
@contextlib.contextmanager
def stubbed(holders: Sequence[tuple[nn.Module, torch.Tensor]]):
    """Each module's ``forward`` returns its ready output (hooks and callers still run)."""
    for m, y in holders:
        m.forward = (lambda y: lambda *a, **k: y)(y)
    try:
        yield
    finally:
        for m, _ in holders:
            del m.forward


def branch_pass(calls: Sequence[tuple[nn.Module, torch.Tensor, torch.Tensor]]) -> tuple[dict, bool]:
    """Seconds to call every module on its input; and whether every call added a branch
    (its output differs from the stub's)."""
    outs: list = []
    with torch.no_grad():
        t = clocked(lambda: outs.extend(m(x) for m, x, _ in calls))
    return t, all(not torch.equal(o, y) for o, (_, _, y) in zip(outs, calls))


def module_inputs(steps: Steps, shapes: dict, d: int, seed: int = 5) -> dict:
    """{module: (input, ready base output)} of its real shape at 1/d of the tokens (any d
    dividing both counts, not only the step divisors)."""
    g = torch.Generator().manual_seed(seed)
    tokens = {"img": IMAGE_TOKENS // d, "txt": steps.text_tokens // d}
    out = {}
    for n, (i, o) in shapes.items():
        lead = (1,) if stream(n) == "temb" else (1, tokens[stream(n)])
        out[n] = (torch.randn(*lead, i, generator=g).to(steps.device, S.DTYPE),
                  torch.zeros(*lead, o, dtype=S.DTYPE, device=steps.device))
    return out


def branch_cost(steps: Steps, ours: nn.Module, peer: nn.Module, shapes: dict, Y, py: Sequence[str],
                repeats: int, cross_check: bool, divisors: Sequence[int] = BRANCH_DIVISORS) -> dict:
    """Ours (ComposedModel lowrank, composition Y) and PEFT (unfused, ``py`` active) per step,
    timed at 1/d of the tokens for the two ``divisors`` and scaled from the larger count.
    The modules on ``temb`` (one token whatever the image) are timed apart and not scaled.
    ``cross_check``: also the stubbed branches at the step's smaller count, where the real
    forward with and without them is timed (``forward_check``)."""
    cm = ComposedModel(Backend(ours), lora_mode="lowrank")
    cm.want(Y)
    cm.ensure()
    peer.set_adapters(list(py), [s for _, s in Y])
    d_forward = max(steps.divisors)
    inp = {d: module_inputs(steps, shapes, d) for d in {*divisors, *([d_forward] if cross_check else [])}}
    groups = {"tokens": sorted(n for n in shapes if stream(n) != "temb"),
              "temb": sorted(n for n in shapes if stream(n) == "temb")}
    sides = {"ours": (ours, lambda m: m), "peft": (peer, lambda m: m.base_layer)}
    t = {side: {d: [] for d in divisors} for side in sides}
    fixed = {side: [] for side in sides}
    added = {side: True for side in sides}

    def one(side: str, d: int, names: list) -> dict:
        model, holder = sides[side]
        mods = [model.get_submodule(n) for n in names]
        with stubbed([(holder(m), inp[d][n][1]) for m, n in zip(mods, names)]):
            s, ok = branch_pass([(m, *inp[d][n]) for m, n in zip(mods, names)])
        added[side] = added[side] and ok
        return s

    at_forward = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            for d in divisors:
                t[side][d].append(one(side, d, groups["tokens"]))
            fixed[side].append(one(side, divisors[0], groups["temb"]))
            if cross_check:
                at_forward[side].append(one(side, d_forward, groups["tokens"]))
    out = {side: dict(two_clocks(lambda c, side=side: scaled({d: med_of(v, c) for d, v in t[side].items()}, steps.full,
                                                             divisors, fixed=med_of(fixed[side], c))),
                      samples=t[side]) for side in sides}
    out["check"] = {"ok": all(added.values()), "every_module_adds_a_branch": added}
    out["divisors"], out["full_tokens"] = list(divisors), steps.full
    if cross_check:
        out["forward_check"] = forward_samples(steps, ours, peer, cm, Y, repeats)
        for side in sides:
            out[side]["at_forward_divisor"] = {c: med_of(at_forward[side], c) for c in ("wall", "cpu")}
    cm.reset()
    return out


# ---- the cells ------------------------------------------------------------------------------
def cells(rows: dict, base: dict, costs: dict, steps: int, images: Sequence[int], blocks: int) -> dict:
    """Totals per composition, mode and N; the crossover; auto's choice against it."""
    base_s = base["full_s"]
    out = {}
    for cell, c in costs.items():
        merge, low = rows[f"merge/warm_switch/{cell}"], rows[f"lowrank/new_composition/{cell}"]
        switch = {"ours merge": merge["ours_s"], "ours lowrank": low["ours_s"], "PEFT fused": merge["peer_s"],
                  "PEFT unfused": low["peer_s"]}
        step = {"ours merge": base_s, "ours lowrank": base_s + c["ours"]["full_s"], "PEFT fused": base_s,
                "PEFT unfused": base_s + c["peft"]["full_s"]}
        branch_image = steps * c["ours"]["full_s"]  # what the branch adds to one image
        gap = switch["ours merge"] - switch["ours lowrank"]
        crossover = max(0.0, gap / branch_image) if branch_image > 0 else math.inf
        by_n = {}
        for n in images:
            total = {k: switch[k] + n * steps * step[k] for k in switch}
            auto = choose(switch["ours merge"], switch["ours lowrank"], branch_image, n, steps * base_s)
            total["ours auto"] = total[f"ours {auto.mode}"]
            best = min(("merge", "lowrank"), key=lambda m: total[f"ours {m}"])
            peft = min(total["PEFT fused"], total["PEFT unfused"])
            # automode keeps its current mode (merge, at the start) when the two are within its margin
            margin = HYSTERESIS * (switch["ours merge"] + n * steps * base_s)
            by_n[str(n)] = {
                "total_s": total, "auto_mode": auto.mode, "auto_reason": auto.reason, "cheaper_mode": best,
                "auto_ok": auto.mode == best or abs(total["ours merge"] - total["ours lowrank"]) <= margin,
                "ours_merge_le_peft_fused": total["ours merge"] <= total["PEFT fused"],
                "ours_lowrank_le_peft_unfused": total["ours lowrank"] <= total["PEFT unfused"],
                "ours_auto_le_best_peft": total["ours auto"] <= peft,
            }
        out[cell] = {"switch_s": switch, "step_s": step, "branch_per_step_s": {"ours": c["ours"]["full_s"],
                     "peft": c["peft"]["full_s"]}, "branch_per_step_cpu_s": {"ours": c["ours"]["cpu"]["full_s"],
                     "peft": c["peft"]["cpu"]["full_s"]}, "crossover_images": crossover, "by_images": by_n,
                     "scaling_ok": c["ours"]["scaling_ok"] and c["peft"]["scaling_ok"], "check": c["check"],
                     "forward_check": forward_check(c) if "forward_check" in c else None}
    return out


def forward_samples(steps: Steps, ours: nn.Module, peer: nn.Module, cm: ComposedModel, Y, repeats: int) -> dict:
    """The real forward at the smaller count, in turn (at most 2 samples each): base (ours
    reset), ours with its branches, PEFT unfused."""
    d = max(steps.divisors)
    t: dict = {"divisor": d, "base": [], "ours": [], "peft": []}
    for _ in range(min(repeats, 2)):
        cm.reset()
        t["base"].append(clocked(lambda: steps.forward(d)))
        cm.want(Y)
        cm.ensure()
        t["ours"].append(clocked(lambda: steps.forward(d, ours)))
        t["peft"].append(clocked(lambda: steps.forward(d, peer)))
    return t


def forward_check(c: dict) -> dict:
    """(forward with branches - base forward) / the stubbed branch time, CPU time, at the
    same token count: near 1 when the stub times what the forward pays. With it, the stubbed
    time per token at that count over the one the totals use (1/``divisors``' larger count):
    how much each call's fixed overhead would weigh if the branches were timed there."""
    f = c["forward_check"]
    d, base = f["divisor"], med_of(f["base"], "cpu")
    sides = ("ours", "peft")
    cpu = {side: c[side]["cpu"] for side in sides}
    at = {side: c[side]["at_forward_divisor"]["cpu"] for side in sides}
    used = min(c["divisors"])
    return {"divisor": d, "clock": "cpu", "samples": len(f["base"]),
            **{f"{side}_forward_minus_base_over_branch": (med_of(f[side], "cpu") - base) / (at[side] + cpu[side]["fixed_s"])
               for side in sides},
            **{f"{side}_per_token_at_forward_over_used": at[side] / (c["full_tokens"] / d)
               / cpu[side]["per_token_s"][used] for side in sides}}


def summary(cells_: dict) -> dict:
    every = [v for c in cells_.values() for v in c["by_images"].values()]
    return {
        "ours_merge_le_peft_fused_all": all(v["ours_merge_le_peft_fused"] for v in every),
        "ours_lowrank_le_peft_unfused_all": all(v["ours_lowrank_le_peft_unfused"] for v in every),
        "ours_auto_le_best_peft_all": all(v["ours_auto_le_best_peft"] for v in every),
        "auto_picks_cheaper_all": all(v["auto_ok"] for v in every),
        "scaling_ok_all": all(c["scaling_ok"] for c in cells_.values()),
        "branch_checks_ok": all(c["check"]["ok"] for c in cells_.values()),
    }
