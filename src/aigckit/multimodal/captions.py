"""Captioned Fashion-MNIST: captions made from the class label, many phrasings per class, and a light/dark attribute
read off the image.

Training captions come from ``TRAIN_TEMPLATES`` x ``TRAIN_NOUNS`` (synonyms per class) x an optional attribute;
``heldout_phrasings.json`` (beside this file) holds templates and synonyms that are never used in training, so a
prompt made from it tests whether the model follows words it never saw (through the frozen text encoder).

The attribute: the mean brightness of an image's garment pixels (> 40 of 255). The darkest third of the training set
is "dark", the lightest third "light" (thresholds ``DARK_BELOW`` / ``LIGHT_ABOVE``, measured on the train split);
the middle third gets no attribute. A caption may leave a readable attribute out, never states a wrong one.

Every (class, attribute) pair is a *caption key* ``class * 3 + attr`` (attr 0 none, 1 light, 2 dark); ``choices(key)``
lists the caption ids that fit an image of that key.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from aigckit.data.images import FASHION_MNIST_CLASSES
from aigckit.errors import AigcError

HELDOUT_FILE = Path(__file__).with_name("heldout_phrasings.json")

TRAIN_TEMPLATES = [
    "{a} {noun}",
    "a photo of {a} {noun}",
    "a picture of {a} {noun}",
    "a grayscale photo of {a} {noun}",
    "{a} {noun} on a black background",
    "this is {a} {noun}",
    "a small image of {a} {noun}",
    "{noun}",
]

TRAIN_NOUNS: dict[str, list[str]] = {
    "t-shirt/top": ["t-shirt", "top", "tee", "short-sleeved shirt"],
    "trouser": ["pair of trousers", "trousers", "pair of pants", "pair of jeans"],
    "pullover": ["pullover", "sweater", "sweatshirt", "jumper"],
    "dress": ["dress", "summer dress", "frock", "long dress"],
    "coat": ["coat", "jacket", "winter coat", "raincoat"],
    "sandal": ["sandal", "pair of sandals", "open shoe", "summer shoe"],
    "shirt": ["shirt", "blouse", "collared shirt", "long-sleeved shirt"],
    "sneaker": ["sneaker", "pair of sneakers", "sports shoe", "athletic shoe"],
    "bag": ["bag", "handbag", "purse", "shoulder bag"],
    "ankle boot": ["ankle boot", "boot", "pair of boots", "heeled boot"],
}

ATTR_WORDS = {1: ["light", "pale", "bright"], 2: ["dark", "dim", "dark-coloured"]}  # not "black": the background is
ATTR_NAMES = ["", "light", "dark"]
FOREGROUND = 40  # pixel value above which a pixel belongs to the garment
DARK_BELOW = 148.0  # garment mean brightness: the train split's 1/3 and 2/3 quantiles (see ``attribute_thresholds``)
LIGHT_ABOVE = 186.5


def article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def render(template: str, noun: str, attr_word: str = "") -> str:
    phrase = f"{attr_word} {noun}" if attr_word else noun
    return template.format(a=article(phrase), noun=phrase)


def garment_brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean value of the garment pixels (> FOREGROUND) of uint8 images N x 1 x H x W -> N floats."""
    x = images.flatten(1)
    fg = x > FOREGROUND
    total = torch.where(fg, x, torch.zeros((), dtype=x.dtype)).sum(1, dtype=torch.int64)
    return total.float() / fg.sum(1).clamp(min=1).float()


def attribute_thresholds(images: torch.Tensor) -> tuple[float, float]:
    """The 1/3 and 2/3 quantiles of garment brightness (how DARK_BELOW / LIGHT_ABOVE were measured)."""
    b = garment_brightness(images)
    return torch.quantile(b, 1 / 3).item(), torch.quantile(b, 2 / 3).item()


def attributes(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> attribute per image: 0 none, 1 light, 2 dark."""
    b = garment_brightness(images)
    return torch.where(b < DARK_BELOW, 2, torch.where(b > LIGHT_ABOVE, 1, 0)).long()


@lru_cache(maxsize=1)
def heldout() -> dict:
    d = json.loads(HELDOUT_FILE.read_text())
    if set(d["nouns"]) != set(FASHION_MNIST_CLASSES):
        raise AigcError(f"{HELDOUT_FILE}: nouns must cover exactly the Fashion-MNIST classes")
    return d


@dataclass(frozen=True)
class CaptionSet:
    """All training captions, and which of them fit each caption key (here class * 3 + attr; for shapes the scene)."""

    texts: list[str]  # index 0 is "" (the empty prompt, for caption dropout)
    choices: list[list[int]]  # caption key -> caption ids

    def choice_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids K x M padded with 0, counts K): a random fitting caption per key without Python loops."""
        m = max(len(c) for c in self.choices)
        ids = torch.zeros((len(self.choices), m), dtype=torch.long)
        for k, c in enumerate(self.choices):
            ids[k, : len(c)] = torch.tensor(c)
        return ids, torch.tensor([len(c) for c in self.choices])


@lru_cache(maxsize=1)
def train_captions() -> CaptionSet:
    texts = [""]
    by_class_attr: dict[tuple[int, int], list[int]] = {}
    for c, cls in enumerate(FASHION_MNIST_CLASSES):
        for attr in (0, 1, 2):
            ids = []
            for tmpl in TRAIN_TEMPLATES:
                for noun in TRAIN_NOUNS[cls]:
                    for word in [""] + ATTR_WORDS.get(attr, []):
                        if attr and not word:
                            continue  # the attribute-free captions are listed once, under attr 0
                        ids.append(len(texts))
                        texts.append(render(tmpl, noun, word))
            by_class_attr[(c, attr)] = ids
    choices = []
    for c in range(len(FASHION_MNIST_CLASSES)):
        plain = by_class_attr[(c, 0)]
        choices += [plain, plain + by_class_attr[(c, 1)], plain + by_class_attr[(c, 2)]]
    _check_disjoint(texts)
    return CaptionSet(texts, choices)


def _check_disjoint(texts: list[str]) -> None:
    h = heldout()
    for cls, nouns in h["nouns"].items():
        for n in nouns:
            if n in TRAIN_NOUNS[cls] or any(n in other for other in TRAIN_NOUNS[cls]):
                raise AigcError(f"held-out noun {n!r} is also a training noun")


def heldout_prompts(per_class: int = 10, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, class) pairs built from held-out templates and held-out nouns only, ``per_class`` per class."""
    h = heldout()
    rng = random.Random(seed)
    out = []
    for c, cls in enumerate(FASHION_MNIST_CLASSES):
        pool = [render(t, n) for t in h["templates"] for n in h["nouns"][cls]]
        rng.shuffle(pool)
        out += [(pool[i % len(pool)], c) for i in range(per_class)]
    return out


def seen_prompts(per_class: int = 10, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, class) pairs from the training captions without an attribute word, ``per_class`` per class: the
    control for ``heldout_prompts`` (how much of a model's miss is the words rather than the images)."""
    caps = train_captions()
    rng = random.Random(seed)
    out = []
    for c in range(len(FASHION_MNIST_CLASSES)):
        pool = [caps.texts[i] for i in caps.choices[3 * c]]
        rng.shuffle(pool)
        out += [(pool[i % len(pool)], c) for i in range(per_class)]
    return out


PHRASINGS = ("held-out", "training")


def class_prompts(per_class: int = 10, seed: int = 0, phrasings: str = "held-out") -> list[tuple[str, int]]:
    """``heldout_prompts`` (phrasings "held-out", the measure) or ``seen_prompts`` ("training", the control)."""
    if phrasings not in PHRASINGS:
        raise AigcError(f"phrasings must be held-out or training, got {phrasings!r}", param="phrasings")
    return (heldout_prompts if phrasings == "held-out" else seen_prompts)(per_class, seed)


def train_prompt(c: int, seed: int = 0) -> str:
    """One plain training caption of class c (for grids)."""
    return render(TRAIN_TEMPLATES[1], TRAIN_NOUNS[FASHION_MNIST_CLASSES[c]][0])
