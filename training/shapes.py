"""The procedural dataset the tiny model and its demo LoRAs are trained on.

A picture is one flat-coloured shape (circle, square or triangle) on a flat background,
described by ``"a {colour} {shape} on a {colour} background"``. Each LoRA's dataset is the
same pictures with one effect a person can name:

- ``palette`` (a style): every colour swapped for its opposite in the palette (red and
  green, blue and orange, yellow and purple, white and black), so "a red circle on a blue
  background" comes out a green circle on an orange one;
- ``stripes`` (a detail): the shape filled with diagonal stripes of its own colour, darker;
- ``snowman`` (a character the base model never draws): a snowman of two stacked discs in
  the shape's colour, always centred, instead of the shape.

Drawing is pure torch arithmetic on a pixel grid (anti-aliased by a one-pixel ramp on the
signed distance), so the same parameters give the same pixels on every machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIZE = 128
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12), "green": (0.12, 0.66, 0.22), "blue": (0.14, 0.26, 0.86),
    "yellow": (0.95, 0.85, 0.15), "white": (0.96, 0.96, 0.96), "black": (0.06, 0.06, 0.06),
    "purple": (0.55, 0.20, 0.70), "orange": (0.96, 0.55, 0.10),
}
EFFECTS = ("palette", "stripes", "snowman")
#: How far a shape's centre may be from the picture's, as a fraction of the side.
JITTER = 0.06
#: The stripes' period in pixels along the image's x and y axes (diagonal stripes, 45 degrees).
STRIPE_PERIOD = 20
#: The snowman's two discs (centre x, centre y, radius) as fractions of the image side.
SNOWMAN = ((0.5, 0.66, 0.22), (0.5, 0.33, 0.15))
#: The palette style's swap: each colour and its opposite (an involution of :data:`COLOURS`).
OPPOSITE = {"red": "green", "green": "red", "blue": "orange", "orange": "blue",
            "yellow": "purple", "purple": "yellow", "white": "black", "black": "white"}


@dataclass(frozen=True)
class Picture:
    shape: str
    fg: str
    bg: str
    cx: float  # centre, fraction of the side
    cy: float
    r: float  # half the size, fraction of the side

    @property
    def prompt(self) -> str:
        return prompt_of(self.shape, self.fg, self.bg)


def prompt_of(shape: str, fg: str, bg: str) -> str:
    return f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_prompts() -> list[str]:
    return [prompt_of(s, f, b) for s in SHAPES for f in COLOURS for b in COLOURS if f != b]


def sample_pictures(n: int, generator: torch.Generator) -> list[Picture]:
    """``n`` pictures with shape, colours, size and (near the centre) place drawn from ``generator``."""
    names = list(COLOURS)
    out = []
    for _ in range(n):
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=generator))]
        fg = int(torch.randint(len(names), (1,), generator=generator))
        bg = (fg + 1 + int(torch.randint(len(names) - 1, (1,), generator=generator))) % len(names)
        r, cx, cy = (float(v) for v in torch.rand(3, generator=generator))
        # near the centre, as a subject is framed: where the shape goes is not in the prompt, and
        # a model this small draws a blend of places when every place is as likely
        out.append(Picture(shape, names[fg], names[bg], 0.5 + JITTER * (2 * cx - 1), 0.5 + JITTER * (2 * cy - 1),
                           0.22 + 0.1 * r))
    return out


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return c.view(1, size).expand(size, size), c.view(size, 1).expand(size, size)


def _coverage(distance_px: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) -> coverage in [0, 1] with a one-pixel ramp."""
    return (0.5 - distance_px).clamp(0.0, 1.0)


def _disc(x, y, cx, cy, r, size) -> torch.Tensor:
    return _coverage((torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r) * size)


def shape_mask(p: Picture, size: int = SIZE) -> torch.Tensor:
    x, y = _grid(size)
    if p.shape == "circle":
        return _disc(x, y, p.cx, p.cy, p.r, size)
    if p.shape == "square":
        return _coverage((torch.maximum((x - p.cx).abs(), (y - p.cy).abs()) - p.r * 0.85) * size)
    # an upright equilateral triangle inscribed in the circle of radius 1.15 r, its centroid lifted
    # so that it spans the same rows as a circle of radius r
    r, cy = 1.15 * p.r, p.cy + 0.15 * p.r
    d = torch.stack([
        (y - cy) - r / 2,  # base
        ((x - p.cx) * math.sqrt(3) - (y - cy)) / 2 - r / 2,
        (-(x - p.cx) * math.sqrt(3) - (y - cy)) / 2 - r / 2,
    ]).amax(0)
    return _coverage(d * size)


def snowman_mask(size: int = SIZE) -> torch.Tensor:
    x, y = _grid(size)
    return torch.maximum(*(_disc(x, y, cx, cy, r, size) for cx, cy, r in SNOWMAN))


def stripe_pattern(size: int = SIZE) -> torch.Tensor:
    """1 on the dark stripes, 0 between them (anti-aliased), diagonal at 45 degrees."""
    x, y = _grid(size)
    phase = ((x + y) * size / STRIPE_PERIOD) % 1.0
    return _coverage((torch.minimum(phase, 1 - phase) - 0.25) * STRIPE_PERIOD)


def draw(p: Picture, effect: str | None = None, size: int = SIZE) -> torch.Tensor:
    """The picture as a (3, size, size) float tensor in [0, 1], with ``effect`` (one of
    :data:`EFFECTS`) or none."""
    if effect not in (None, *EFFECTS):
        raise ValueError(f"unknown effect {effect!r}; expected one of {EFFECTS}")
    fg_name, bg_name = (OPPOSITE[p.fg], OPPOSITE[p.bg]) if effect == "palette" else (p.fg, p.bg)
    fg = torch.tensor(COLOURS[fg_name]).view(3, 1, 1)
    bg = torch.tensor(COLOURS[bg_name]).view(3, 1, 1)
    mask = snowman_mask(size) if effect == "snowman" else shape_mask(p, size)
    colour = fg.expand(3, size, size)
    if effect == "stripes":
        colour = fg * (1 - 0.65 * stripe_pattern(size))
    return bg * (1 - mask) + colour * mask


def batch(pictures: list[Picture], effect: str | None = None, size: int = SIZE) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1], the range the VAE works in."""
    return torch.stack([draw(p, effect, size) for p in pictures]) * 2 - 1
