"""The switch + N images cells of the compose benchmark: what they time and how they add
up, on the tiny Qwen-Image model (no timing assertions)."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_core
from benchmarks import compose_images as I
from benchmarks import compose_setup as S
from workers.automode import choose
from workers.backends.tiny import TINY_TRANSFORMER_CONFIG


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).to(S.DTYPE).eval().requires_grad_(False)
    shapes = S.target_shapes(model)
    paths = S.write_loras(shapes, 4, 2, str(tmp_path_factory.mktemp("loras")))
    ads = [lora_core.load_adapter(p) for p in paths]
    peer = copy.deepcopy(model)
    for i, p in enumerate(paths):
        S.peer_load(peer, p, f"a{i}")
    return model, peer, shapes, ads


def test_module_inputs_have_the_shapes_the_real_forward_gives(tiny):
    model, _, shapes, _ = tiny
    steps = I.Steps(model, (128, 64), 128)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].shape))
             for n in shapes]
    try:
        steps.forward(64)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(shapes)
    ins = I.module_inputs(steps, shapes, 64)
    for n, shape in seen.items():
        assert ins[n][0].shape == shape, n
        assert ins[n][1].shape[:-1] == shape[:-1] and ins[n][1].shape[-1] == shapes[n][1], n
    assert {I.stream(n) for n in shapes} == {"img", "txt", "temb"}
    assert steps.tokens[64] == {"img": 64, "txt": 2, "temb": 1}


def test_the_stubbed_call_is_the_branch_alone_ours_and_peft(tiny):
    model, peer, shapes, ads = tiny
    from workers.wrapper import ComposedModel

    from benchmarks.compose_svdq import Backend

    Y = [(ads[0], 0.7), (ads[1], 0.9)]
    cm = ComposedModel(Backend(model), lora_mode="lowrank")
    cm.want(Y)
    cm.ensure()
    peer.set_adapters(["a0", "a1"], [0.7, 0.9])
    steps = I.Steps(model, (128, 64), 128)
    ins = I.module_inputs(steps, shapes, 64)
    name = "transformer_blocks.0.attn.to_q"
    x, y0 = ins[name]
    y0 = y0 + 1.0  # a base output the branch must be added to
    ref = sum(s * (ad.layers[name].alpha / ad.layers[name].A.shape[0])
              * ((x.double() @ ad.layers[name].A.double().T) @ ad.layers[name].B.double().T) for ad, s in Y)
    try:
        for m, holder in ((model.get_submodule(name), model.get_submodule(name)),
                          (peer.get_submodule(name), peer.get_submodule(name).base_layer)):
            with I.stubbed([(holder, y0)]), torch.no_grad():
                _, added = I.branch_pass([(m, x, y0)])
                y = m(x).double()
            assert added
            # the branch's term, to bf16 rounding of the output (the base output is 1.0: ulp 2^-7)
            assert float((y - y0.double() - ref).abs().max()) <= 0.05 * float(ref.abs().max()) + 2**-7
            assert "forward" not in vars(holder)  # the stub is gone
        with I.stubbed([(model.get_submodule(name), y0)]):
            cm.reset()  # no branch: the call returns the stub's output, and the pass says so
            assert I.branch_pass([(model.get_submodule(name), x, y0)])[1] is False
    finally:
        cm.reset()


def test_branch_cost_runs_every_module_and_restores_the_model(tiny):
    model, peer, shapes, ads = tiny
    steps = I.Steps(model, (128, 64), 128)
    fp = S.fingerprint(model, sorted(shapes))
    out = I.branch_cost(steps, model, peer, shapes, [(ads[1], 0.5)], ["a1"], 1, cross_check=True)
    assert out["check"]["ok"], out["check"]
    assert out["divisors"] == list(I.BRANCH_DIVISORS) and out["full_tokens"] == I.IMAGE_TOKENS + 128
    for side in ("ours", "peft"):
        # timed at the branch divisors, not the step's; and at the step's smaller count for the cross-check
        assert out[side]["full_s"] > 0 and set(out[side]["per_token_s"]) == set(I.BRANCH_DIVISORS)
        assert out[side]["cpu"]["full_s"] > 0 and out[side]["at_forward_divisor"]["cpu"] > 0
    assert len(out["forward_check"]["base"]) == 1
    check = I.forward_check(out)
    assert check["divisor"] == 128  # the step's smaller count
    for side in ("ours", "peft"):
        assert check[f"{side}_per_token_at_forward_over_used"] > 0
    other = I.branch_cost(steps, model, peer, shapes, [(ads[1], 0.5)], ["a1"], 1, cross_check=False, divisors=(8, 4))
    assert set(other["ours"]["per_token_s"]) == {8, 4} and "forward_check" not in other
    assert S.fingerprint(model, sorted(shapes)) == fp
    assert not any(model.get_submodule(n)._forward_hooks for n in shapes)  # the branches are gone


def test_base_step_scales_from_the_larger_count(tiny):
    model, *_ = tiny
    base = I.Steps(model, (128, 64), 128).base(1)
    rest = base["at_s"][64]
    assert base["full_s"] == pytest.approx(rest * 64 + base["modulation_s"] + base["attention_full_s"])
    assert set(base["cpu"]) >= {"full_s", "per_token_spread"} and base["scaling_ok"] == base["cpu"]["scaling_ok"]


def test_scaled_flags_a_cost_that_is_not_proportional():
    ok = I.scaled({128: 1.0, 64: 2.0}, 4224, (128, 64), fixed=0.5)
    assert ok["scaling_ok"] and ok["per_token_spread"] == pytest.approx(1.0)
    assert ok["full_s"] == pytest.approx(2.0 * 64 + 0.5)
    bad = I.scaled({128: 1.0, 64: 1.2}, 4224, (128, 64))  # mostly a fixed cost: per token 1.67x apart
    assert not bad["scaling_ok"] and bad["per_token_spread"] == pytest.approx(2 / 1.2)


def term(full: float) -> dict:
    return {"full_s": full, "scaling_ok": True, "cpu": {"full_s": full}}


def synthetic(s_merge=10.0, s_low=1.0, peer_merge=20.0, peer_low=0.01, ours_branch=0.01, peft_branch=0.012):
    rows = {"merge/warm_switch/r4x1": {"ours_s": s_merge, "peer_s": peer_merge},
            "lowrank/new_composition/r4x1": {"ours_s": s_low, "peer_s": peer_low}}
    costs = {"r4x1": {"ours": term(ours_branch), "peft": term(peft_branch), "check": {"ok": True}}}
    return rows, costs


def test_cells_add_up_and_auto_is_checked_against_the_crossover():
    rows, costs = synthetic()
    base, steps = {"full_s": 0.1}, 50
    cell = I.cells(rows, base, costs, steps, (1, 4, 16, 64), blocks=2)["r4x1"]
    assert cell["crossover_images"] == pytest.approx((10.0 - 1.0) / (50 * 0.01))  # 18 images
    for n, v in cell["by_images"].items():
        n = int(n)
        t = v["total_s"]
        assert t["ours merge"] == pytest.approx(10.0 + n * steps * 0.1)
        assert t["ours lowrank"] == pytest.approx(1.0 + n * steps * (0.1 + 0.01))
        assert t["PEFT unfused"] == pytest.approx(0.01 + n * steps * (0.1 + 0.012))
        assert v["cheaper_mode"] == ("lowrank" if n < 18 else "merge")
        assert v["auto_mode"] == choose(10.0, 1.0, 0.5, n, 5.0).mode
        assert v["auto_ok"]
    # N = 16 is inside automode's margin (it saves 1 s of a 90 s run): it stays on merge, and that is right
    assert cell["by_images"]["16"]["auto_mode"] == "merge" and cell["by_images"]["4"]["auto_mode"] == "lowrank"
    summary = I.summary({"r4x1": cell})
    assert summary["auto_picks_cheaper_all"] and summary["ours_merge_le_peft_fused_all"]
    # at N = 1 our 1 s branch switch loses to PEFT's set_adapters (0.01 s) + its dearer branch
    assert not cell["by_images"]["1"]["ours_auto_le_best_peft"] and not summary["ours_auto_le_best_peft_all"]


def test_cells_report_when_peft_is_cheaper():
    rows, costs = synthetic(peft_branch=0.005)  # PEFT's branch cheaper per step than ours
    cell = I.cells(rows, {"full_s": 0.1}, costs, 50, (1, 16), blocks=2)["r4x1"]
    assert not cell["by_images"]["16"]["ours_lowrank_le_peft_unfused"]
    assert not I.summary({"r4x1": cell})["ours_lowrank_le_peft_unfused_all"]
