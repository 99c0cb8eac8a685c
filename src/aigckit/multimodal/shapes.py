"""A procedural compositional data set: small RGB images of one or two coloured shapes with captions such as
"a small red circle" or "a red circle to the left of a blue square". Our own renderer, deterministic by seed.

Scenes: one shape (colour, shape, size small/large, anywhere) or two medium shapes side by side (relation "left")
or one above the other ("above"); A is the left/upper shape. Captions phrase a scene several ways ("A to the left
of B", "B to the right of A", "A above B", "B below A").

Held-out combinations (never rendered into the training split, ``HELDOUT_PAIRS`` and ``HELDOUT_RELATIONS``): four
colour-shape pairs, and two (shape A, relation, shape B) triples. ``split="test"`` scenes each contain at least one
held-out combination; ``seen_scenes`` gives test scenes drawn like the training ones.

Rendering: 4x supersampled with PIL, box-filtered down to 32x32 (anti-aliased edges), black background.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from aigckit.data.images import ImageDataset
from aigckit.errors import AigcError
from aigckit.multimodal.captions import CaptionSet

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
           "purple": (170, 60, 220), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 5.0, "large": 10.0}  # radius in pixels at 32 px
PAIR_RADIUS = 6.0
RELATIONS = ("left", "above")
RESOLUTION = 32
SS = 4  # supersampling factor

HELDOUT_PAIRS = {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "cross")}
HELDOUT_RELATIONS = {("circle", "above", "square"), ("triangle", "left", "cross")}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str = "medium"


@dataclass(frozen=True)
class Scene:
    a: Obj
    b: Obj | None = None  # None: one shape
    relation: str = ""  # "left" | "above": a is left of / above b

    @property
    def count(self) -> int:
        return 1 if self.b is None else 2

    def heldout(self) -> bool:
        objs = [self.a] if self.b is None else [self.a, self.b]
        if any((o.colour, o.shape) in HELDOUT_PAIRS for o in objs):
            return True
        return self.b is not None and (self.a.shape, self.relation, self.b.shape) in HELDOUT_RELATIONS


def _phrase(o: Obj, size: bool = True) -> str:
    words = ([o.size] if size and o.size != "medium" else []) + [o.colour, o.shape]
    return "a " + " ".join(words)


def captions(s: Scene) -> list[str]:
    """Every training phrasing of a scene (the first one is the canonical caption)."""
    if s.b is None:
        return [_phrase(s.a), _phrase(s.a, size=False), f"{_phrase(s.a)} on a black background"]
    a, b = _phrase(s.a), _phrase(s.b)
    if s.relation == "left":
        return [f"{a} to the left of {b}", f"{a} left of {b}", f"{b} to the right of {a}", f"{b} right of {a}"]
    return [f"{a} above {b}", f"{b} below {a}", f"{a} on top of {b}", f"{b} under {a}"]


def all_scenes() -> list[Scene]:
    """Every scene the grammar allows: 6 x 4 x 2 single shapes, (6 x 4)^2 x 2 pairs."""
    objs = [Obj(c, s) for c in COLOURS for s in SHAPES]
    singles = [Scene(Obj(c, s, z)) for c in COLOURS for s in SHAPES for z in SIZES]
    pairs = [Scene(a, b, r) for a in objs for b in objs for r in RELATIONS]
    return singles + pairs


def _draw(draw, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    cx, cy, r = cx * SS, cy * SS, r * SS
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=rgb)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:
        raise AigcError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, rng: random.Random) -> torch.Tensor:
    """One scene -> uint8 3 x 32 x 32; positions (and jitter) from ``rng``."""
    from PIL import Image, ImageDraw

    n = RESOLUTION
    im = Image.new("RGB", (n * SS, n * SS), (0, 0, 0))
    d = ImageDraw.Draw(im)
    if scene.b is None:
        r = SIZES[scene.a.size]
        _draw(d, scene.a.shape, rng.uniform(r + 1, n - r - 1), rng.uniform(r + 1, n - r - 1), r, COLOURS[scene.a.colour])
    else:
        r = PAIR_RADIUS
        along = [rng.uniform(r + 1, n / 2 - r + 1), rng.uniform(n / 2 + r - 1, n - r - 1)]  # a first, then b
        across = [rng.uniform(r + 2, n - r - 2) for _ in range(2)]
        for o, u, v in ((scene.a, along[0], across[0]), (scene.b, along[1], across[1])):
            x, y = (u, v) if scene.relation == "left" else (v, u)
            _draw(d, o.shape, x, y, r, COLOURS[o.colour])
    im = im.resize((n, n), Image.BOX)
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(n, n, 3).permute(2, 0, 1).clone()


def sample_scenes(n: int, seed: int, heldout: bool = False) -> list[Scene]:
    """n scenes (half single, half pairs), from the held-out combinations or from the training ones."""
    rng = random.Random(seed)
    pool = [s for s in all_scenes() if s.heldout() == heldout]
    singles = [s for s in pool if s.b is None]
    pairs = [s for s in pool if s.b is not None]
    return [rng.choice(singles) if i % 2 == 0 else rng.choice(pairs) for i in range(n)]


@lru_cache(maxsize=1)
def train_captions() -> CaptionSet:
    texts, choices = [""], []
    for s in all_scenes():
        if s.heldout():
            choices.append([0])  # never drawn: no training image has a held-out scene
            continue
        ids = []
        for c in captions(s):
            ids.append(len(texts))
            texts.append(c)
        choices.append(ids)
    return CaptionSet(texts, choices)


@lru_cache(maxsize=4)
def dataset(split: str = "train", n: int | None = None, seed: int = 0) -> tuple[ImageDataset, CaptionSet]:
    """Rendered images with labels = scene ids (index into ``all_scenes()``): train 30,000 seen-combination scenes;
    test 2,000 held-out-combination scenes."""
    if split not in ("train", "test"):
        raise AigcError(f"split must be 'train' or 'test', got {split!r}")
    n = n or (30000 if split == "train" else 2000)
    scenes = all_scenes()
    ids = {s: i for i, s in enumerate(scenes)}
    chosen = sample_scenes(n, seed * 7 + (0 if split == "train" else 1), heldout=split == "test")
    rng = random.Random(seed * 11 + (0 if split == "train" else 1))
    images = torch.stack([render(s, rng) for s in chosen])
    labels = torch.tensor([ids[s] for s in chosen])
    return ImageDataset(images, labels, [], name="shapes"), train_captions()


def grid_prompts() -> list[str]:
    return ["a small red circle", "a large blue square", "a green triangle", "a yellow circle",
            "a red circle to the left of a blue square", "a white cross above a purple triangle",
            "a blue circle", "a green square to the right of a red triangle",
            "a yellow circle above a white square"]
