import random

import torch

from aigckit.data.images import FASHION_MNIST_CLASSES
from aigckit.multimodal import captions, shapes


def test_heldout_phrasings_never_appear_in_training_captions():
    texts = captions.train_captions().texts
    h = captions.heldout()
    joined = "\n".join(texts)
    for nouns in h["nouns"].values():
        for n in nouns:
            assert n not in joined, n
    frames = [t.split("{a}")[0].strip() for t in h["templates"] if t.split("{a}")[0].strip()]
    for f in frames:  # "here is", "a product shot of", ...: no training caption starts with a held-out frame
        assert not any(t.startswith(f + " ") for t in texts), f
    for p, c in captions.heldout_prompts(4):
        assert p not in texts
        assert any(n in p for n in h["nouns"][FASHION_MNIST_CLASSES[c]])


def test_caption_choices_fit_class_and_attribute():
    cs = captions.train_captions()
    assert cs.texts[0] == ""
    for c, cls in enumerate(FASHION_MNIST_CLASSES):
        nouns = captions.TRAIN_NOUNS[cls]
        for attr in (0, 1, 2):
            texts = [cs.texts[i] for i in cs.choices[c * 3 + attr]]
            assert all(any(n in t for n in nouns) for t in texts)
            wrong = captions.ATTR_WORDS[3 - attr] if attr else captions.ATTR_WORDS[1] + captions.ATTR_WORDS[2]
            assert not any(w in t.split() for t in texts for w in wrong)  # never a wrong attribute
            if attr:
                assert any(w in t.split() for t in texts for w in captions.ATTR_WORDS[attr])
    ids, counts = cs.choice_table()
    assert ids.shape[0] == 30 and (counts > 0).all()


def test_attributes_from_brightness():
    imgs = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    imgs[0, :, 5:20, 5:20] = 250  # light garment
    imgs[1, :, 5:20, 5:20] = 100  # dark garment
    imgs[2, :, 5:20, 5:20] = 165  # in between: no attribute
    assert captions.attributes(imgs).tolist() == [1, 2, 0]
    assert captions.render("a photo of {a} {noun}", "overcoat") == "a photo of an overcoat"


def test_shapes_deterministic_and_heldout_combinations_never_in_training():
    a, _ = shapes.dataset("train", n=40, seed=3)
    shapes.dataset.cache_clear()
    b, _ = shapes.dataset("train", n=40, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (40, 3, 32, 32) and a.images.dtype == torch.uint8
    scenes = shapes.all_scenes()
    assert not any(scenes[i].heldout() for i in a.labels.tolist())
    t, _ = shapes.dataset("test", n=20, seed=3)
    assert all(scenes[i].heldout() for i in t.labels.tolist())
    caps = shapes.train_captions()
    for i in a.labels.tolist():
        assert all(caps.texts[j] in shapes.captions(scenes[i]) for j in caps.choices[i])


def test_shapes_render_colour_and_relation():
    red, blue = shapes.Obj("red", "square"), shapes.Obj("blue", "circle")
    img = shapes.render(shapes.Scene(red, blue, "left"), random.Random(0)).float()
    redness = img[0] - img[2]  # > 0 on the red square, < 0 on the blue circle
    cols = torch.arange(32).float()
    red_x = (redness.clamp(min=0).sum(0) * cols).sum() / redness.clamp(min=0).sum()
    blue_x = ((-redness).clamp(min=0).sum(0) * cols).sum() / (-redness).clamp(min=0).sum()
    assert red_x < 16 < blue_x  # "a red square to the left of a blue circle"
    assert "a red square to the left of a blue circle" in shapes.captions(shapes.Scene(red, blue, "left"))
    assert "a blue circle to the right of a red square" in shapes.captions(shapes.Scene(red, blue, "left"))
