"""Training and evaluation of the captioning models (``aigc caption-train``): teacher-forced cross-entropy on one
fitting caption per image per step (never the empty one), drawn from the captioned data's caption lists.
``--decoder gru`` trains the small decoder of our own (``multimodal/caption.py``), ``--decoder smollm2`` an image
prefix for the frozen SmolLM2 (ClipCap, ``multimodal/prefixcap.py``; the language model's weights stay as they are).

Evaluation (``evaluate_captioner``): on Fashion-MNIST test images, the share whose generated caption names the right
class (the caption's garment noun belongs to the image's class; nouns of all classes are checked, longest first),
and corpus BLEU-4 against every fitting training caption of the image as references.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aigckit.data.images import FASHION_MNIST_CLASSES, to_float
from aigckit.errors import AigcError
from aigckit.multimodal.caption import CaptionConfig, CaptionModel, bleu4, build_vocab
from aigckit.train.short import run_steps, start_run
from aigckit.train.t2i import caption_data

PRESETS = {"tiny": dict(widths=(8, 16), hidden=32, embed=16), "small": dict(widths=(16, 32, 64), hidden=192, embed=64)}
PREFIX_PRESETS = {"tiny": dict(widths=(8, 16), hidden=32), "small": dict(widths=(16, 32, 64), hidden=512)}
DECODERS = ("gru", "smollm2")


@dataclass
class CaptionTrainArgs:
    out: str
    data: str = "fashion-mnist-captions"
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 64
    lr: float | None = None  # default: 2e-3 (gru), 1e-3 (smollm2)
    seed: int = 0
    size: str = "small"
    threads: int | None = None
    log_every: int = 20
    ckpt_every: int = 200
    eval_n: int = 1000
    decoder: str = "gru"  # gru (our own small decoder) | smollm2 (a prefix for the frozen language model)
    lm: str = "smollm2-135m-instruct"  # with decoder smollm2: the frozen language model (store name or path)
    prefix_len: int = 8

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise AigcError("give --steps N or --minutes M")
        if self.size not in PRESETS:
            raise AigcError(f"unknown size {self.size!r}; known: {', '.join(PRESETS)}", param="size")
        if self.decoder not in DECODERS:
            raise AigcError(f"unknown decoder {self.decoder!r}; known: {', '.join(DECODERS)}", param="decoder")
        if self.lr is None:
            self.lr = 2e-3 if self.decoder == "gru" else 1e-3


def train_captioner(args: CaptionTrainArgs, *, progress: bool = True) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    ds, caps = caption_data(args.data, "train", args.seed)
    ids, counts = caps.choice_table()
    for k in range(len(ids)):  # drop the empty caption (id 0) from the choices
        row = [i for i in ids[k, : counts[k]].tolist() if i != 0]
        if row:
            ids[k, : len(row)], counts[k] = torch.tensor(row), len(row)
    torch.manual_seed(args.seed)
    if args.decoder == "gru":
        cfg = CaptionConfig(vocab=build_vocab(caps.texts[1:]), resolution=ds.resolution, channels=ds.channels,
                            **PRESETS[args.size])
        model = captioner = CaptionModel(cfg)
        family = "caption"
    else:
        from aigckit.multimodal.prefixcap import PrefixCaptionConfig, PrefixCaptioner, PrefixMapper
        from aigckit.text.lm import load_lm

        lm = load_lm(args.lm, kernels="torch")  # plain nn.Linear: gradients flow through to the prefix
        cfg = PrefixCaptionConfig(lm=args.lm, lm_dim=lm.model.config.n_embd, prefix_len=args.prefix_len,
                                  resolution=ds.resolution, channels=ds.channels, **PREFIX_PRESETS[args.size])
        model = PrefixMapper(cfg)
        captioner = PrefixCaptioner(model, lm)
        family = "prefix-caption"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    config = {"family": family, "model": cfg.to_dict(), "train": asdict(args), "data": {"name": args.data}}
    run = start_run(args.out, config)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keys = ds.labels[idx]
        cap = ids[keys, (torch.rand(len(idx), generator=gen) * counts[keys]).long()]
        return captioner.loss(to_float(ds.images[idx]), [caps.texts[i] for i in cap.tolist()])

    final, step, train_time = run_steps(run, args, config, model, opt, len(ds), batch_loss, desc="train caption",
                                        progress=progress, clip_grad=1.0)
    if args.eval_n:
        rep = (evaluate_captioner(captioner, n=args.eval_n) if args.data == "fashion-mnist-captions"
               else evaluate_shapes_captioner(captioner, n=min(args.eval_n, 500)))
        rep.update(train_steps=step, train_time_s=round(train_time, 1), images_seen=step * args.batch_size)
        (run / "eval.json").write_text(json.dumps(rep, indent=2))
    return final


def named_class(caption: str) -> int | None:
    """The Fashion-MNIST class whose noun (training or held-out synonym) the caption names, longest noun first."""
    from aigckit.multimodal import captions as C

    nouns = [(n, c) for c, cls in enumerate(FASHION_MNIST_CLASSES)
             for n in C.TRAIN_NOUNS[cls] + C.heldout()["nouns"][cls]]
    padded = f" {caption} "
    for n, c in sorted(nouns, key=lambda x: -len(x[0])):
        if f" {n} " in padded:
            return c
    return None


@torch.no_grad()
def evaluate_captioner(model, *, n: int = 1000, beams: int = 1) -> dict:
    """``model``: either kind of captioner (``caption.load_captioner``)."""
    ds, caps = caption_data("fashion-mnist-captions", "test")
    x, keys = to_float(ds.images[:n]), ds.labels[:n]
    hyps = []
    for i in range(0, len(x), 250):
        hyps += model.describe(x[i:i + 250], beams=beams)
    right = sum(named_class(h) == int(k) // 3 for h, k in zip(hyps, keys))
    refs = [[caps.texts[j] for j in caps.choices[int(k)] if j != 0] for k in keys]
    return {"n": len(hyps), "names_right_class": round(right / len(hyps), 4), "bleu4": round(bleu4(hyps, refs), 4),
            "beams": beams, "examples": hyps[:5]}


@torch.no_grad()
def evaluate_shapes_captioner(model, *, n: int = 500, seed: int = 0, beams: int = 1) -> dict:
    """On fresh renders of seen and of held-out combinations: the share of captions that are exactly one of the
    scene's phrasings (every colour, shape, size and relation right), and BLEU-4 against those phrasings."""
    import random

    from aigckit.multimodal import shapes as S

    out: dict = {"n": n, "beams": beams}
    for name, held in (("seen", False), ("heldout", True)):
        scenes = S.sample_scenes(n, seed + (7 if held else 3), heldout=held)
        rng = random.Random(seed)
        hyps = model.describe(to_float(torch.stack([S.render(s, rng) for s in scenes])), beams=beams)
        refs = [S.captions(s) for s in scenes]
        out[name] = {"exact": round(sum(h in r for h, r in zip(hyps, refs)) / n, 4),
                     "bleu4": round(bleu4(hyps, refs), 4), "examples": hyps[:3]}
    return out
