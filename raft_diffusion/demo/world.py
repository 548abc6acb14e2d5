"""The demo world: small pictures of one coloured shape on a plain background, and gold scorers.

A scene is one shape (circle, square, triangle or cross) of one of six colours on one of five
background colours, with a size, a position and a *fade* (the shape colour blended towards the
background, which lowers contrast). Its caption names only colour, shape and background, e.g.
``"a red circle on a blue background"``: size, position and fade are left to the model, so
samples of one prompt differ in exactly what the gold aesthetic score measures, and ranking
them has something to find.

The gold scorers work on any RGB image (renders or model samples), straight from pixels:

* the **background** is the per-channel median of the 1-pixel border;
* the **foreground** is every pixel whose colour is further than a threshold from the
  background (half the distance between the background and the median colour of a first,
  loose foreground guess, at least 30 on the 0-255 scale); the **shape** is its largest
  4-connected component.

:func:`gold_aesthetic` (1-10, higher is better) is ``1 + 9 * (0.35 size + 0.35 centring +
0.15 contrast + 0.15 cleanliness)``, each term in [0, 1]:

* size: ``exp(-0.5 * ((side / W - 0.45) / 0.12) ** 2)`` with ``side`` the larger side of the
  shape's bounding box and ``W`` the image width: best when the shape spans 45 % of the frame;
* centring: ``exp(-0.5 * (d / (0.25 * W)) ** 2)`` with ``d`` the distance from the shape's
  centroid to the image centre;
* contrast: ``min(1, |fg - bg| / 240)``, the RGB distance between the shape's median colour
  and the background;
* cleanliness: the share of foreground pixels that belong to the shape (stray specks lower it).

An image with no foreground scores 1.

:func:`gold_alignment` is 1 when the image shows the colour and the shape its prompt asks for:
the colour is the palette colour nearest to the shape's median colour; the shape is the
template (circle, square, triangle, cross, each drawn to fill a box) with the smallest mean
absolute difference to the shape's mask cropped to its bounding box and resized to 16x16.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for clean anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 40),
    "purple": (170, 50, 210),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (120, 120, 120),
    "white": (245, 245, 245),
    "blue": (40, 90, 230),
    "green": (40, 180, 60),
}
SHAPES = ("circle", "square", "triangle", "cross")

MIN_SIDE, MAX_SIDE = 8.0, 22.0  # shape bounding-box side in pixels
MAX_FADE = 0.3  # at most 30 % of the shape colour is blended towards the background
IDEAL_SIDE = 0.45  # gold size term peaks at this fraction of the frame

_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    side: float  # bounding-box side, pixels
    cx: float  # centre, pixels from the left
    cy: float  # centre, pixels from the top
    fade: float  # 0 = pure colour, MAX_FADE = most blended towards the background

    def to_dict(self) -> dict:
        return asdict(self)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(colour: str, shape: str, background: str) -> str:
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. ``"a red circle on a blue background"`` (no size or position)."""
    return make_caption(scene.colour, scene.shape, scene.background)


def parse_caption(prompt: str) -> tuple[str, str, str]:
    """``(colour, shape, background)`` of a world caption; ValueError for anything else."""
    match = _CAPTION.match(prompt.strip().lower())
    if not match or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in BACKGROUNDS:
        raise ValueError(f"not a demo-world caption: {prompt!r} (expected e.g. 'a red circle on a blue background')")
    return match[1], match[2], match[3]


@lru_cache(maxsize=None)
def _combos() -> tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, str], ...]]:
    """All (colour, shape, background) triples, split into train and held-out eval.

    For every (colour, shape) pair one allowed background is held out, rotating over the
    backgrounds, so that every colour, shape and background appears in both splits but the
    eval triples never occur in training prompts.
    """
    train, held_out = [], []
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            backgrounds = [b for b in BACKGROUNDS if b != colour]
            out = backgrounds[(i + 2 * j) % len(backgrounds)]
            for background in backgrounds:
                (held_out if background == out else train).append((colour, shape, background))
    return tuple(train), tuple(held_out)


def train_prompts() -> list[str]:
    """Captions the RAFT loop may train on (84)."""
    return [make_caption(*c) for c in _combos()[0]]


def _validation_backgrounds() -> set[tuple[str, str, str]]:
    """One more background per (colour, shape) pair, taken from the training triples the same way
    the held-out ones are, so that a validation split is to the rest what held-out is to training."""
    val = set()
    train = set(_combos()[0])
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            backgrounds = [b for b in BACKGROUNDS if b != colour and (colour, shape, b) in train]
            val.add((colour, shape, backgrounds[(i + 2 * j + 1) % len(backgrounds)]))
    return val


def fit_prompts() -> list[str]:
    """The training captions less the validation split (60): train on these while tuning."""
    val = _validation_backgrounds()
    return [make_caption(*c) for c in _combos()[0] if c not in val]


def val_prompts() -> list[str]:
    """Validation captions (24), training captions whose triples :func:`fit_prompts` lacks: tune
    on these, never on the held-out ones."""
    val = _validation_backgrounds()
    return [make_caption(*c) for c in _combos()[0] if c in val]


def eval_prompts() -> list[str]:
    """Held-out captions (24): combinations of colour, shape and background absent from training."""
    return [make_caption(*c) for c in _combos()[1]]


def all_prompts() -> list[str]:
    return train_prompts() + eval_prompts()


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = {"a", "an", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS}
    return sorted(words)


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """``n`` random scenes, deterministic in ``seed``; ``split`` is "train", "eval" or "all"."""
    train, held_out = _combos()
    combos = {"train": train, "eval": held_out, "all": train + held_out}.get(split)
    if combos is None:
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        colour, shape, background = combos[rng.integers(len(combos))]
        side = float(rng.uniform(MIN_SIDE, MAX_SIDE))
        lo, hi = side / 2 + 1, SIZE - side / 2 - 1  # keep the whole shape in the frame
        cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
        fade = float(rng.uniform(0.0, MAX_FADE))
        scenes.append(Scene(colour, shape, background, round(side, 3), round(cx, 3), round(cy, 3), round(fade, 3)))
    return scenes


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    h = side / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "cross":
        arm = 0.2 * side  # half the arm width: arms are 40 % of the side
        draw.rectangle([cx - h, cy - arm, cx + h, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - h, cx + arm, cy + h], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 32x32 RGB image."""
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    fg = (1 - scene.fade) * np.array(COLOURS[scene.colour], dtype=np.float64) + scene.fade * bg
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    s = SUPERSAMPLE
    _draw_shape(ImageDraw.Draw(image), scene.shape, scene.cx * s, scene.cy * s, scene.side * s,
                tuple(int(round(v)) for v in fg))
    return image.resize((SIZE, SIZE), Image.BOX)


def render_many(scenes: Iterable[Scene]) -> list[Image.Image]:
    return [render(s) for s in scenes]


# ---------------------------------------------------------------------------------------------
# Gold scorers: pixels only.


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (a flood fill; images are tiny)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


@dataclass
class Analysis:
    """What the gold scorers read off one image."""

    found: bool
    background: np.ndarray  # RGB
    foreground: np.ndarray  # median RGB of the shape
    mask: np.ndarray  # bool, the shape (largest foreground component)
    n_foreground: int  # all foreground pixels, the shape's and stray ones


def analyze(image) -> Analysis:
    """Find background, foreground and the shape in an RGB image (PIL or HxWx3 array)."""
    pixels = _as_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    loose = distance > 30
    if loose.sum() == 0:
        return Analysis(False, background, background, loose, 0)
    guess = np.median(pixels[loose], axis=0)
    threshold = max(30.0, 0.5 * float(np.linalg.norm(guess - background)))
    foreground = distance > threshold
    mask = _largest_component(foreground)
    if mask.sum() == 0:
        return Analysis(False, background, background, mask, 0)
    return Analysis(True, background, np.median(pixels[mask], axis=0), mask, int(foreground.sum()))


TERMS = ("size", "centring", "contrast", "cleanliness")  # the gold aesthetic score's terms, in order


def _terms_one(a: Analysis, width: int) -> tuple[float, float, float, float] | None:
    if not a.found:
        return None
    ys, xs = np.nonzero(a.mask)
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    size = np.exp(-0.5 * ((side / width - IDEAL_SIDE) / 0.12) ** 2)
    centre = (width - 1) / 2
    d = np.hypot(xs.mean() - centre, ys.mean() - centre)
    centring = np.exp(-0.5 * (d / (0.25 * width)) ** 2)
    contrast = min(1.0, float(np.linalg.norm(a.foreground - a.background)) / 240)
    clean = a.mask.sum() / max(a.n_foreground, 1)
    return size, centring, contrast, clean


def _aesthetic_one(a: Analysis, width: int) -> float:
    terms = _terms_one(a, width)
    if terms is None:
        return 1.0
    size, centring, contrast, clean = terms
    return float(1 + 9 * (0.35 * size + 0.35 * centring + 0.15 * contrast + 0.15 * clean))


def gold_aesthetic(images: Sequence) -> np.ndarray:
    """Gold aesthetic score in [1, 10] per image (see the module docstring for the formula)."""
    return np.array([_aesthetic_one(analyze(im), _as_array(im).shape[1]) for im in images], dtype=np.float64)


def gold_terms(images: Sequence) -> dict[str, np.ndarray]:
    """The four terms of the gold aesthetic score per image, each in [0, 1] (0 for an image with no
    shape), keyed as in :data:`TERMS`: what a change of the score is made of."""
    rows = [_terms_one(analyze(im), _as_array(im).shape[1]) or (0.0,) * 4 for im in images]
    table = np.array(rows, dtype=np.float64).reshape(len(rows), 4)
    return {name: table[:, i] for i, name in enumerate(TERMS)}


@lru_cache(maxsize=None)
def _templates(n: int = 16) -> np.ndarray:
    """Soft masks [shape, n, n] of each shape drawn to fill an n x n box."""
    out = []
    for shape in SHAPES:
        big = n * 8
        image = Image.new("L", (big, big), 0)
        # Draw on pixel centres so that the shape touches the box edges like a thresholded mask does.
        _draw_shape(ImageDraw.Draw(image), shape, big / 2, big / 2, big - 1, 255)
        out.append(np.asarray(image.resize((n, n), Image.BOX), dtype=np.float64) / 255)
    return np.stack(out)


def classify_shape(mask: np.ndarray) -> str:
    """Nearest template to a shape mask cropped to its bounding box (see module docstring)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.uint8) * 255
    templates = _templates()
    n = templates.shape[-1]
    # Upsample by nearest first so that BOX downsampling to n x n averages real pixel areas.
    h, w = crop.shape
    big = Image.fromarray(crop).resize((w * n, h * n), Image.NEAREST).resize((n, n), Image.BOX)
    soft = np.asarray(big, dtype=np.float64) / 255
    return SHAPES[int(np.abs(templates - soft).mean(axis=(1, 2)).argmin())]


def classify_colour(rgb: np.ndarray) -> str:
    """Palette colour nearest to an RGB value."""
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], dtype=np.float64)
    return names[int(np.linalg.norm(palette - rgb, axis=-1).argmin())]


def describe(image) -> dict:
    """What the gold checker sees: ``{"colour": ..., "shape": ...}`` (None for an empty image)."""
    a = analyze(image)
    if not a.found:
        return {"colour": None, "shape": None}
    return {"colour": classify_colour(a.foreground), "shape": classify_shape(a.mask)}


def gold_alignment_parts(images: Sequence, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per image 0/1 arrays: ``colour`` right, ``shape`` right, and ``both`` (= gold alignment)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    colour_ok, shape_ok = [], []
    for image, prompt in zip(images, prompts):
        colour, shape, _ = parse_caption(prompt)
        seen = describe(image)
        colour_ok.append(seen["colour"] == colour)
        shape_ok.append(seen["shape"] == shape)
    colour_ok, shape_ok = np.array(colour_ok, dtype=np.float64), np.array(shape_ok, dtype=np.float64)
    return {"colour": colour_ok, "shape": shape_ok, "both": colour_ok * shape_ok}


def gold_alignment(images: Sequence, prompts: Sequence[str]) -> np.ndarray:
    """1 where the image shows the colour and the shape its prompt names, else 0."""
    return gold_alignment_parts(images, prompts)["both"]
