"""The tiny backend's trained weights draw what the prompt says: the background's colour,
the shape's colour and its kind read back from the rendered image (the simple reading of
``testsupport.image_measures.read_picture``), far above what random weights manage."""
from __future__ import annotations

import pytest

from training.evaluate import cases, reading_scores, render
from training.shapes import prompt_of
from workers.backends.registry import make_backend

CASES = cases()


def score(spec):
    """Share of the cases whose (shape, shape colour, background) reading matches the prompt."""
    return list(reading_scores(render(make_backend(spec, device="cpu"), [prompt_of(*c) for c in CASES]), CASES).values())


@pytest.fixture(scope="module")
def trained():
    return score({"backend": "tiny"})


def test_trained_weights_draw_the_prompts_colours_and_shapes(trained):
    shape, fg, bg = trained
    assert bg >= 0.9 and fg >= 0.65 and shape >= 0.45, f"shape {shape:.2f}, foreground {fg:.2f}, background {bg:.2f}"


def test_random_weights_do_not(trained):
    shape, fg, bg = score({"backend": "tiny", "weights": "random"})
    assert bg < 0.5 and fg < 0.5, f"random weights: shape {shape:.2f}, foreground {fg:.2f}, background {bg:.2f}"


def test_weights_spec_is_checked():
    from workers.backends.base import BackendSpecError

    with pytest.raises(BackendSpecError, match="weights: must be 'trained' or 'random'"):
        make_backend({"backend": "tiny", "weights": "best"}, device="cpu")
    with pytest.raises(BackendSpecError, match="seed: chooses random weights"):
        make_backend({"backend": "tiny", "weights": "trained", "seed": 3}, device="cpu")


def test_the_weights_are_refused_with_another_tokenizer(tmp_path):
    """The text encoder was trained on this tokenizer's ids; the tokenizer is trained from code,
    so a change of its corpus or of the tokenizers package must not pass silently."""
    import json
    import shutil

    from storage.localfs import hash_file
    from workers.backends import tiny

    d = tmp_path / "weights"
    shutil.copytree(tiny.TRAINED_DIR, d)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == tiny.tokenizer_digest(tiny._train_tokenizer())  # the committed one fits
    meta["tokenizer_sha256"] = "0" * 64
    (d / "meta.json").write_text(json.dumps(meta))
    sums = {**tiny.read_sums(str(d)), "meta.json": hash_file(str(d / "meta.json"))[0]}
    (d / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    with pytest.raises(RuntimeError, match="not the one the weights .* were trained with"):
        tiny.build_trained_pipeline(directory=str(d))
