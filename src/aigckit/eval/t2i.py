"""How well text-to-image models follow words they were not trained on.

Fashion-MNIST (``prompt_accuracy``): images sampled from the held-out phrasings (``multimodal/heldout_phrasings.json``)
are classified by the project's classifier (``eval/classifier.py``); the score is the share assigned to the prompt's
class. Shapes (``shapes_accuracy``): an attribute evaluator trained on rendered scenes (``train_shapes_judge``; every
colour-shape combination, since it judges, not generates) reads count, colours, shapes, size and relation from each
generated image; a prompt is fully correct when every attribute its scene names is right.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError


def prompt_accuracy(run, *, guidance: float, per_class: int = 20, steps: int = 50, seed: int = 0,
                    classifier=None, batch: int = 100, phrasings: str = "held-out") -> dict:
    """``phrasings``: "held-out" (the measure) or "training" (captions seen in training, the control)."""
    from aigckit.eval.classifier import load_classifier, predict
    from aigckit.image.api import load_image_model
    from aigckit.multimodal.captions import class_prompts

    pairs = class_prompts(per_class, seed, phrasings)
    m = load_image_model(run)
    if not m.text_conditioned:
        raise AigcError(f"{run} is not a text-conditioned model")
    clf = classifier or load_classifier()[0]
    imgs, t0 = [], time.perf_counter()
    for i in range(0, len(pairs), batch):
        chunk = [p for p, _ in pairs[i:i + batch]]
        imgs.append(m.sample(len(chunk), prompts=chunk, guidance=guidance, steps=steps, seed=seed + i).tensor)
    dt = time.perf_counter() - t0
    _, pred = predict(clf, torch.cat(imgs))
    y = torch.tensor([c for _, c in pairs])
    per = [(pred[y == c] == c).float().mean().item() for c in range(10)]
    return {"guidance": guidance, "n": len(pairs), "accuracy": round((pred == y).float().mean().item(), 4),
            "per_class": [round(a, 3) for a in per], "steps": steps, "seconds_per_image": round(dt / len(pairs), 4),
            "prompts": f"{phrasings} phrasings"}


# ------------------------------------------------------------------------------------------------ shapes judge

HEADS = {"count": 2, "colour_a": 6, "shape_a": 4, "size": 2, "colour_b": 6, "shape_b": 4, "relation": 2}


class ShapesJudge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, v) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.conv(x))
        return {k: head(h) for k, head in self.heads.items()}


def scene_targets(scene) -> dict[str, int]:
    """Attribute indices of a scene; -1 where the scene names no such attribute (ignored)."""
    from aigckit.multimodal import shapes as S

    cols, shp = list(S.COLOURS), list(S.SHAPES)
    t = {"count": scene.count - 1, "colour_a": cols.index(scene.a.colour), "shape_a": shp.index(scene.a.shape),
         "size": -1, "colour_b": -1, "shape_b": -1, "relation": -1}
    if scene.b is None:
        t["size"] = list(S.SIZES).index(scene.a.size)
    else:
        t.update(colour_b=cols.index(scene.b.colour), shape_b=shp.index(scene.b.shape),
                 relation=S.RELATIONS.index(scene.relation))
    return t


def _render_all(n: int, seed: int):
    import random

    from aigckit.data.images import to_float
    from aigckit.multimodal import shapes as S

    rng = random.Random(seed)
    scenes = S.all_scenes()
    chosen = [rng.choice(scenes[:48]) if i % 2 == 0 else rng.choice(scenes[48:]) for i in range(n)]
    x = to_float(torch.stack([S.render(s, rng) for s in chosen]))
    tg = [scene_targets(s) for s in chosen]
    return x, {k: torch.tensor([t[k] for t in tg]) for k in HEADS}


def train_shapes_judge(n: int = 20000, epochs: int = 2, seed: int = 0, progress: bool = False) -> tuple[ShapesJudge, dict]:
    """Train on n renders of every scene (all combinations); returns the judge and its accuracy on fresh renders."""
    torch.manual_seed(seed)
    x, y = _render_all(n, seed)
    model = ShapesJudge()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - 127, 128):
            idx = perm[i:i + 128]
            out = model(x[idx])
            loss = sum(F.cross_entropy(out[k], y[k][idx], ignore_index=-1) for k in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    xt, yt = _render_all(2000, seed + 1)
    model.eval()
    with torch.no_grad():
        out = model(xt)
    acc = {k: round(((out[k].argmax(1) == yt[k]) | (yt[k] < 0)).float()[yt[k] >= 0].mean().item(), 4) for k in HEADS}
    return model, acc


def judge(model: ShapesJudge, images: torch.Tensor, scenes) -> dict:
    """Per-attribute accuracy and the share of images whose every named attribute is right."""
    with torch.no_grad():
        out = model(images)
    tg = [scene_targets(s) for s in scenes]
    ok_all = torch.ones(len(scenes), dtype=torch.bool)
    acc = {}
    for k in HEADS:
        t = torch.tensor([x[k] for x in tg])
        valid = t >= 0
        right = out[k].argmax(1) == t
        ok_all &= right | ~valid
        if valid.any():
            acc[k] = round(right[valid].float().mean().item(), 4)
    acc["fully_correct"] = round(ok_all.float().mean().item(), 4)
    return acc


def shapes_accuracy(run, *, guidance: float, n: int = 200, steps: int = 50, seed: int = 0, judge_model=None) -> dict:
    """Generated images for n seen-combination and n held-out-combination scenes (canonical captions), judged."""
    from aigckit.image.api import load_image_model
    from aigckit.multimodal import shapes as S

    m = load_image_model(run)
    jm = judge_model or train_shapes_judge()[0]
    out = {"guidance": guidance, "steps": steps}
    for name, held in (("seen", False), ("heldout", True)):
        scenes = S.sample_scenes(n, seed + (7 if held else 3), heldout=held)
        prompts = [S.captions(s)[0] for s in scenes]
        imgs = torch.cat([m.sample(len(prompts[i:i + 100]), prompts=prompts[i:i + 100], guidance=guidance,
                                   steps=steps, seed=seed + i).tensor for i in range(0, n, 100)])
        out[name] = judge(jm, imgs, scenes)
    return out
