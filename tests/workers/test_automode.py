"""``lora_mode: auto``: the pure choice, its bookkeeping, and the tiny model choosing by
what it measured (images identical to the explicit mode it chose)."""
from __future__ import annotations

import pytest

from lora_core import load_adapter
from testsupport import lora as T
from workers.automode import AutoMode, choose
from workers.wrapper import ComposedModel

from .test_wrapper import backend as tiny  # noqa: F401 - the module's tiny model fixture
from .test_wrapper import render


def test_no_measurements_merges():
    assert choose(None, None, None, None, None).mode == "merge"
    assert choose(1.0, None, None, None, 0.5).mode == "merge", "no run length yet"


def test_explores_the_branch_only_when_a_merge_switch_matters():
    # a merge switch of 1 s against runs of 4 images x 0.5 s: a third of a run -> try the branch
    c = choose(1.0, None, None, 4, 0.5)
    assert c.mode == "lowrank" and "33%" in c.reason
    # 10 ms against 100 images x 1 s: 0.001% of a run -> stay
    assert choose(0.01, None, None, 100, 1.0).mode == "merge"


@pytest.mark.parametrize("s_merge,s_low,delta,n,want", [
    (2.0, 0.1, 0.05, 10, "lowrank"),   # saves 2 - 0.1 - 0.5 = 1.4 s a run
    (2.0, 0.1, 0.05, 100, "merge"),    # costs 5 - 1.9 = 3.1 s a run
    (0.5, 0.01, 0.0, 1, "lowrank"),    # a free branch always wins
])
def test_picks_the_cheaper_run(s_merge, s_low, delta, n, want):
    c = choose(s_merge, s_low, delta, n, 1.0, current="merge" if want == "lowrank" else "lowrank")
    gain = s_merge - s_low - n * delta  # independent: seconds a run saves with the branch
    assert c.mode == want == ("lowrank" if gain > 0 else "merge")


def test_hysteresis_keeps_the_current_mode_on_a_near_tie():
    # gain +0.05 s on a run of ~11 s: within 2% -> no flip either way
    assert choose(1.05, 0.0, 0.1, 10, 1.0, current="merge").mode == "merge"
    assert choose(0.95, 0.0, 0.1, 10, 1.0, current="lowrank").mode == "lowrank"


def test_bookkeeping_runs_and_branch_time():
    a = AutoMode()
    a.next_mode()
    a.switched("merge", 2.0)
    a.rendered(3, 3.0, None)
    a.rendered(1, 1.0, None)
    c = a.next_mode()  # closes a run of 4 images
    assert a.images_per_run.value == 4 and a.render_s.value == pytest.approx(1.0)
    assert c.mode == "lowrank"  # 2 s of a 6 s run
    a.switched("lowrank", 0.2)
    a.rendered(2, 2.4, branch_seconds=0.4)  # the branch took 0.2 s of each 1.2 s image
    assert a.delta_s.value == pytest.approx(0.2)
    assert a.render_s.value == pytest.approx(0.7 * 1.0 + 0.3 * 1.0)


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("auto")
    out = []
    for seed in (11, 12, 13):
        layers = T.random_layers(T.linear_shapes(tiny.transformer, ("attn.", "img_mlp")), rank=8, seed=seed, scale=0.3)
        out.append(load_adapter(T.write_safetensors(d / f"{seed}.safetensors", T.peft_state_dict(layers))))
    return out


def _render_counted(m: ComposedModel, pairs) -> bytes:
    import time

    m.want(pairs)
    m.ensure()
    t0 = time.perf_counter()
    out = render(m, pairs)
    m.rendered(1, time.perf_counter() - t0)
    return out


def test_auto_on_the_tiny_model_measures_chooses_and_renders_like_the_mode_it_chose(tiny, loras):
    m = ComposedModel(tiny, lora_mode="auto")
    m.auto.explore_share = 0.0  # try the branch as soon as a merge switch has been timed
    imgs = []
    for i, ad in enumerate(loras):
        imgs.append(_render_counted(m, [(ad, 0.8)]))
        assert m.held_mode == ("merge" if i == 0 else m.auto.choice.mode)
    a = m.auto
    assert a.switch_s["merge"].value > 0 and a.switch_s["lowrank"].value > 0
    assert 0 < a.delta_s.value < a.render_s.value, "the branch's own time was measured, and is a part of a render"
    # the third switch followed the rule on what had been measured by then
    assert m.held_mode == m.auto.choice.mode
    m.reset()
    # each image is the one the explicit mode gives
    for mode_used, ad, img in zip(["merge", "lowrank"], loras[:2], imgs[:2]):
        ref = ComposedModel(tiny, lora_mode=mode_used)
        assert render(ref, [(ad, 0.8)]) == img, mode_used
        ref.reset()
    assert not any(mod._forward_hooks for mod in tiny.transformer.modules())


def test_worker_rows_say_which_mode_rendered(tmp_path):
    from jobs.manifest import validate_manifest
    from jobs.options import FarmOptions
    from workers.worker import RenderWorker

    lora = T.random_layers({"transformer_blocks.0.attn.to_q": (128, 128)}, rank=2, seed=1)
    p = T.write_safetensors(tmp_path / "l.safetensors", T.peft_state_dict(lora))
    man = validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                         "output": str(tmp_path / "out"), "jobs": [{"prompt": "x", "loras": [{"uri": p, "strength": 0.5}]}]})
    w = RenderWorker(options=FarmOptions(lora_mode="lowrank"), cache_dir=str(tmp_path / "cache"), num_threads=1)
    rows = w.render(man.jobs, str(tmp_path / "out"))
    assert rows[0].status == "ok", rows[0].error
    assert rows[0].lora_mode == "lowrank"
    assert w.state()["lora_mode"]["mode"] == "lowrank"
    auto = RenderWorker(cache_dir=str(tmp_path / "cache"), num_threads=1)  # lora_mode auto by default
    rows = auto.render(man.jobs, str(tmp_path / "out2"))
    st = auto.state()["lora_mode"]
    assert rows[0].lora_mode == st["mode"] == "merge" and st["render_s_per_image"] > 0, st
