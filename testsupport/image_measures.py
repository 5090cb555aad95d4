"""Image-space measures of the demo LoRAs' trained effects (see ``training.shapes``), each
a number per image that its own LoRA moves and the others leave about where it was:

- :func:`palette_swap`: where the background's and the shape's colours lie between the
  prompt's colours (-1) and their opposites in the palette (+1): the style LoRA pushes it
  towards 1;
- :func:`diagonal_stripes`: the share of the image's non-constant luminance power at the
  stripes' frequency and angle: the detail LoRA raises it;
- :func:`snowman_likeness`: how much more of the foreground lies inside the snowman's
  outline than outside it: the character LoRA raises it.

Images are (H, W, 3) arrays (uint8 or float in [0, 1]) or PIL images; every measure is
called as ``measure(image, prompt)`` (only the palette's needs the prompt).
"""
from __future__ import annotations

import re

import numpy as np

# what the dataset's words and effects mean: the stripes' period (pixels along x and y), the
# snowman's discs (cx, cy, r fractions), each colour word's RGB, the palette style's swap
from training.shapes import COLOURS, OPPOSITE, SNOWMAN, STRIPE_PERIOD, Picture, shape_mask


def as_float(img) -> np.ndarray:
    a = np.asarray(img)
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    return a


def diagonal_stripes(img, prompt: str = "", period: float = STRIPE_PERIOD, width: float = 0.35, angle_deg: float = 12.0) -> float:
    lum = as_float(img) @ np.array([0.299, 0.587, 0.114])
    h, w = lum.shape
    power = np.abs(np.fft.fft2(lum - lum.mean())) ** 2
    fy = np.fft.fftfreq(h)[:, None] * np.ones((1, w))
    fx = np.fft.fftfreq(w)[None, :] * np.ones((h, 1))
    radius = np.hypot(fx, fy)
    target = np.sqrt(2) / period  # stripes along x + y = const: frequency (1/p, 1/p)
    angle = np.degrees(np.arctan2(fy, fx)) % 180.0
    band = (np.abs(radius - target) <= width * target) & (np.abs(angle - 45.0) <= angle_deg)
    total = power.sum()
    return float(power[band].sum() / total) if total > 1e-12 else 0.0


def snowman_mask(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    x, y = (x + 0.5) / w, (y + 0.5) / h
    return np.any([np.hypot(x - cx, y - cy) <= r for cx, cy, r in SNOWMAN], axis=0)


def foreground(img, threshold: float = 0.2) -> np.ndarray:
    """Pixels whose colour is far from the background's (the median of the border pixels)."""
    a = as_float(img)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return np.linalg.norm(a - np.median(border, axis=0), axis=2) > threshold


def snowman_likeness(img, prompt: str = "") -> float:
    fg = foreground(img)
    inside = snowman_mask(*fg.shape)
    return float(fg[inside].mean() - fg[~inside].mean())


# a shape's area in units of r^2 (r: its size, a fraction of the side; training.shapes.shape_mask):
# a circle of radius r, a square of half-side 0.85 r, an equilateral triangle in a circle of 1.15 r
AREA = {"circle": np.pi, "square": (2 * 0.85) ** 2, "triangle": 3 * np.sqrt(3) / 4 * 1.15 ** 2}


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: float(np.linalg.norm(np.asarray(rgb) - COLOURS[name])))


def read_picture(img) -> tuple[str, str, str]:
    """(shape, foreground colour, background colour) of a picture of one shape on a flat
    background, read the simple way: the background is the border's median colour, the shape
    the pixels far from it, its kind the one whose outline (of the same area, at the same
    centroid) overlaps those pixels best (intersection over union)."""
    a = as_float(img)
    fg = foreground(a)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg_name = nearest_colour(np.median(border, axis=0))
    if fg.sum() < 16:
        return "none", "none", bg_name
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    cx, cy, share = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h, fg.sum() / (h * w)

    def overlap(kind: str) -> float:
        r = float(np.sqrt(share / AREA[kind]))
        lift = 0.15 * r if kind == "triangle" else 0.0  # its centroid lies 0.15 r below the r-circle's centre
        ideal = shape_mask(Picture(kind, "red", "blue", float(cx), float(cy) - lift, r), h).numpy() > 0.5
        return float((ideal & fg).sum() / (ideal | fg).sum())

    shape = max(AREA, key=overlap)
    return shape, nearest_colour(np.median(a[fg], axis=0)), bg_name


_PROMPT = re.compile(r"\ban? (\w+) (circle|square|triangle) on an? (\w+) background\b")


def prompt_colours(prompt: str) -> tuple[str, str]:
    """(shape colour, background colour) a prompt of the training set asks for."""
    m = _PROMPT.search(prompt)
    if not m or m.group(1) not in COLOURS or m.group(3) not in COLOURS:
        raise ValueError(f"not a prompt of the shapes dataset: {prompt!r}")
    return m.group(1), m.group(3)


def palette_swap(img, prompt: str) -> float:
    """-1 when the background (the border's median colour) and the shape (the median colour
    of the picture's central tenth, where every shape lies) have the prompt's colours, +1
    when they have their opposites (:data:`OPPOSITE`), linear in between: the mean over the
    two of ``(|x - asked| - |x - opposite|) / |asked - opposite|``."""
    a = as_float(img)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    centre = a[int(0.45 * h):int(0.55 * h) + 1, int(0.45 * w):int(0.55 * w) + 1].reshape(-1, 3)
    out = []
    for seen, name in zip((np.median(centre, axis=0), np.median(border, axis=0)), prompt_colours(prompt)):
        asked, opposite = np.asarray(COLOURS[name]), np.asarray(COLOURS[OPPOSITE[name]])
        out.append((np.linalg.norm(seen - asked) - np.linalg.norm(seen - opposite)) / np.linalg.norm(asked - opposite))
    return float(np.mean(out))


MEASURES = {"palette": palette_swap, "stripes": diagonal_stripes, "snowman": snowman_likeness}
