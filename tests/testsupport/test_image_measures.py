"""The image measures the demo-LoRA tests rely on, checked on pictures drawn exactly
(``training.shapes.draw``): each measure tells its effect's pictures from plain ones by a
wide margin, and leaves the other effects' pictures where plain ones are."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from testsupport import image_measures as M
from training import shapes

PICTURES = shapes.sample_pictures(24, torch.Generator().manual_seed(3))


def measured(name, effect, pictures=PICTURES):
    f = M.MEASURES[name]
    return np.array([f(shapes.draw(p, effect).permute(1, 2, 0).numpy(), p.prompt) for p in pictures])


def test_palette_swap_reads_minus_one_for_the_prompts_colours_and_plus_one_for_their_opposites():
    assert np.allclose(measured("palette", None), -1.0, atol=0.02)
    assert np.allclose(measured("palette", "palette"), 1.0, atol=0.02)


@pytest.mark.parametrize("name", ["stripes", "snowman"])
def test_each_measure_tells_its_effect_from_plain_pictures(name):
    # stripes darken the shape's colour: on a black shape there is nothing to see
    pictures = [p for p in PICTURES if p.fg != "black"] if name == "stripes" else PICTURES
    plain, own = measured(name, None, pictures), measured(name, name, pictures)
    assert own.min() > plain.max(), (own.min(), plain.max())


@pytest.mark.parametrize("name", list(M.MEASURES))
def test_other_effects_leave_a_measure_near_plain(name):
    plain, own = measured(name, None).mean(), measured(name, name).mean()
    for other in M.MEASURES:
        if other != name:
            moved = measured(name, other).mean() - plain
            assert abs(moved) < abs(own - plain) / 3, (other, moved, own - plain)


def test_a_prompt_outside_the_dataset_is_refused():
    with pytest.raises(ValueError, match="not a prompt of the shapes dataset"):
        M.prompt_colours("a cat on a sofa")


def test_read_picture_reads_the_drawn_pictures_exactly():
    """The reading the tiny model's test relies on, on pictures drawn exactly: every shape,
    colour and background read right."""
    read = [M.read_picture(shapes.draw(p).permute(1, 2, 0).numpy()) for p in PICTURES]
    assert read == [(p.shape, p.fg, p.bg) for p in PICTURES]
