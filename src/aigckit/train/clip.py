"""Training and evaluation of the CLIP-style model (``aigc clip train``): symmetric contrastive loss between images
and their captions, the text tower frozen (its pooled vectors read from the cached caption bank).

Evaluation (``evaluate_clip``): zero-shot Fashion-MNIST test accuracy from the prompts "a photo of a {class}", and
text -> image retrieval on 1,000 test images each with one caption drawn from its fitting captions: R@K is the
share of captions whose own image is among the K most similar images (exact pairs; identical captions of other
images make this harder, so also reported: class R@1, the top image has the caption's class).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aigckit.data.images import FASHION_MNIST_CLASSES, to_float
from aigckit.errors import AigcError
from aigckit.multimodal import textcond
from aigckit.multimodal.clip import ClipConfig, ClipModel, zero_shot
from aigckit.train.short import run_steps, start_run
from aigckit.train.t2i import caption_data

PRESETS = {"tiny": dict(widths=(8, 16), embed_dim=16), "small": dict(widths=(16, 32, 64), embed_dim=64),
           "base": dict(widths=(32, 64, 128), embed_dim=128)}


@dataclass
class ClipTrainArgs:
    out: str
    data: str = "fashion-mnist-captions"
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    size: str = "small"
    threads: int | None = None
    log_every: int = 20
    ckpt_every: int = 200
    eval_n: int = 10000  # zero-shot test images at the end (0: no evaluation)

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise AigcError("give --steps N or --minutes M")
        if self.size not in PRESETS:
            raise AigcError(f"unknown size {self.size!r}; known: {', '.join(PRESETS)}", param="size")
        if not 2 <= self.batch_size <= 4096:
            raise AigcError(f"batch size must be in 2..4096, got {self.batch_size}", param="batch_size")


def train_clip(args: ClipTrainArgs, *, progress: bool = True) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    ds, caps = caption_data(args.data, "train", args.seed)
    enc = textcond.load_text_encoder(textcond.DEFAULT_TEXT_ENCODER, textcond.DEFAULT_MAX_TOKENS)
    bank = textcond.CaptionBank.build(caps.texts, enc, progress=progress)
    ids, counts = caps.choice_table()
    torch.manual_seed(args.seed)
    cfg = ClipConfig(resolution=ds.resolution, channels=ds.channels, text_dim=enc.dim,
                     text_encoder=textcond.DEFAULT_TEXT_ENCODER, text_max_tokens=textcond.DEFAULT_MAX_TOKENS,
                     **PRESETS[args.size])
    model = ClipModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    config = {"family": "clip", "model": cfg.to_dict(), "train": asdict(args), "data": {"name": args.data}}
    run = start_run(args.out, config)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keys = ds.labels[idx]
        cap = ids[keys, (torch.rand(len(idx), generator=gen) * counts[keys]).long()]
        return model.loss(to_float(ds.images[idx]), bank.cond.pooled[cap], same=cap[:, None] == cap[None, :])

    final, step, train_time = run_steps(run, args, config, model, opt, len(ds), batch_loss, desc="train clip",
                                        progress=progress)
    if args.eval_n and args.data == "fashion-mnist-captions":
        rep = evaluate_clip(model, n=args.eval_n)
        rep.update(train_steps=step, train_time_s=round(train_time, 1), images_seen=step * args.batch_size)
        (run / "eval.json").write_text(json.dumps(rep, indent=2))
    return final


def class_prompts() -> list[str]:
    return [f"a photo of a {c}" for c in FASHION_MNIST_CLASSES]


@torch.no_grad()
def evaluate_clip(model: ClipModel, *, n: int = 10000, retrieval_n: int = 1000, seed: int = 0) -> dict:
    """Zero-shot accuracy on the first n Fashion-MNIST test images and retrieval R@1/R@5 (see module doc)."""
    from aigckit.multimodal import captions

    enc = textcond.load_text_encoder(model.cfg.text_encoder, model.cfg.text_max_tokens)
    ds, caps = caption_data("fashion-mnist-captions", "test")
    x, y = to_float(ds.images[:n]), ds.labels[:n] // 3
    pred = zero_shot(model, x, enc.encode(class_prompts()).pooled)
    acc = (pred == y).float().mean().item()
    g = torch.Generator().manual_seed(seed)
    sel = torch.randperm(len(ds), generator=g)[:retrieval_n]
    ids, counts = caps.choice_table()
    keys = ds.labels[sel]
    cap = ids[keys, (torch.rand(len(sel), generator=g) * counts[keys]).long()]
    texts = [caps.texts[i] for i in cap.tolist()]
    t = model.embed_text(enc.encode(texts).pooled)
    im = model.embed_images(to_float(ds.images[sel]))
    rank = (t @ im.T).argsort(1, descending=True)  # caption -> images, best first
    own = torch.arange(len(sel))[:, None]
    r1 = (rank[:, :1] == own).any(1).float().mean().item()
    r5 = (rank[:, :5] == own).any(1).float().mean().item()
    cls_r1 = ((keys[rank[:, 0]] // 3) == keys // 3).float().mean().item()
    heldout = captions.heldout_prompts(20)
    hp = model.embed_text(enc.encode([p for p, _ in heldout]).pooled)
    hcls = torch.tensor([c for _, c in heldout])
    held_r1 = ((keys[(hp @ im.T).argmax(1)] // 3) == hcls).float().mean().item()
    return {"zero_shot_accuracy": round(acc, 4), "zero_shot_n": len(y), "prompts": "a photo of a {class}",
            "retrieval_n": len(sel), "R@1": round(r1, 4), "R@5": round(r5, 4), "class_R@1": round(cls_r1, 4),
            "heldout_phrasing_class_R@1": round(held_r1, 4)}
