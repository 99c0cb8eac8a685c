"""`aigc clip train | eval | score | search` (the CLIP-style image-text model) and `aigc caption [train]` (parsing
only)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clip", help="CLIP-style image-text model: train, evaluate, score, search",
                       description="A small image encoder and the frozen MiniLM text tower with projection heads, "
                       "trained with the symmetric contrastive loss on captioned images.")
    csub = p.add_subparsers(dest="clip_command", metavar="SUBCOMMAND", parser_class=type(p))

    t = csub.add_parser("train", help="train on captioned data (fashion-mnist-captions | shapes)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--data", default="fashion-mnist-captions", help="fashion-mnist-captions | shapes")
    t.add_argument("--steps", type=int)
    t.add_argument("--minutes", type=float, help="stop after M minutes of training steps")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--size", default="small", help="tiny | small | base")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int)
    t.add_argument("--eval-n", type=int, default=10000, help="zero-shot test images at the end (0: none)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_train)

    e = csub.add_parser("eval", help="zero-shot Fashion-MNIST accuracy and text->image retrieval R@1/R@5")
    e.add_argument("run")
    e.add_argument("--n", type=int, default=10000)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_eval)

    s = csub.add_parser("score", help="rank candidate texts for each image (cosine x 100, best first)")
    s.add_argument("run")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--text", action="append", required=True, help="a candidate text (repeat)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_score)

    q = csub.add_parser("search", help="rank images by a text query")
    q.add_argument("run")
    q.add_argument("query")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_search)

    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    register_caption(sub)


def _train(a) -> int:
    from aigckit.train.clip import ClipTrainArgs, train_clip

    final = train_clip(ClipTrainArgs(out=a.out, data=a.data, steps=a.steps, minutes=a.minutes,
                                     batch_size=a.batch_size, lr=a.lr, seed=a.seed, size=a.size, threads=a.threads,
                                     eval_n=a.eval_n), progress=not a.quiet)
    print(final)
    return 0


def _eval(a) -> int:
    from aigckit.multimodal.clip import load_clip
    from aigckit.train.clip import evaluate_clip

    model, _ = load_clip(a.run)
    rep = evaluate_clip(model, n=a.n)
    print(json.dumps(rep, indent=2) if a.json else "\n".join(f"{k:<28} {v}" for k, v in rep.items()))
    return 0


def _scores(run: str, images: list[str], texts: list[str]):
    from aigckit.multimodal.clip import load_clip
    from aigckit.multimodal.io import read_images
    from aigckit.multimodal.textcond import load_text_encoder

    model, _ = load_clip(run)
    enc = load_text_encoder(model.cfg.text_encoder, model.cfg.text_max_tokens)
    x = read_images(images, model.cfg.resolution, model.cfg.channels)
    return 100 * model.embed_images(x) @ model.embed_text(enc.encode(texts).pooled).T


def _score(a) -> int:
    sims = _scores(a.run, a.images, a.text)
    out = [{"image": img, "ranking": [{"text": a.text[j], "score": round(float(row[j]), 2)}
                                      for j in row.argsort(descending=True).tolist()]}
           for img, row in zip(a.images, sims)]
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out:
            print(r["image"] + ": " + "; ".join(f"{x['text']} ({x['score']})" for x in r["ranking"]))
    return 0


def _search(a) -> int:
    from aigckit.errors import AigcError

    if a.k < 1:
        raise AigcError(f"k must be >= 1, got {a.k}", param="k")
    sims = _scores(a.run, a.images, [a.query])[:, 0]
    order = sims.argsort(descending=True)[: a.k].tolist()
    out = [{"image": a.images[i], "score": round(float(sims[i]), 2)} for i in order]
    print(json.dumps(out, indent=2) if a.json else "\n".join(f"{r['score']:7.2f}  {r['image']}" for r in out))
    return 0


def register_caption(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="describe images in words (built-in fmnist-caption, or a trained run)",
                       description="Generate a caption per image with a captioning model; `aigc caption-train` "
                       "trains one on captioned data.")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--model", default="auto", help="captioning run or built-in model; auto: fmnist-caption for "
                   "greyscale images, shapes-caption for colour ones")
    p.add_argument("--beams", type=int, default=1, help="beam search width (1: greedy)")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: sample words")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_caption)
    t = sub.add_parser("caption-train", help="train a captioning model on captioned data",
                       description="Train a captioner: --decoder gru (default) is a small decoder of our own, fast "
                       "to train; --decoder smollm2 trains an image prefix for the frozen SmolLM2 (ClipCap: only "
                       "the image encoder and mapping network learn; decoding is the text engine's).")
    t.add_argument("--out", required=True)
    t.add_argument("--data", default="fashion-mnist-captions", help="fashion-mnist-captions | shapes")
    t.add_argument("--decoder", default="gru", help="gru | smollm2 (an image prefix for the frozen language model)")
    t.add_argument("--lm", default="smollm2-135m-instruct", help="with --decoder smollm2: the language model")
    t.add_argument("--prefix-len", type=int, default=8, help="with --decoder smollm2: prefix embeddings per image")
    t.add_argument("--steps", type=int)
    t.add_argument("--minutes", type=float)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, help="learning rate (default 2e-3 gru, 1e-3 smollm2)")
    t.add_argument("--size", default="small", help="tiny | small")
    t.add_argument("--threads", type=int)
    t.add_argument("--eval-n", type=int, default=1000)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_caption_train)
    e = sub.add_parser("caption-eval", help="measure a captioning model on held-out images",
                       description="Fashion-MNIST runs: share of test-image captions that name the right class, "
                       "BLEU-4 against the fitting captions. Shapes runs: share of exactly right captions and BLEU-4 "
                       "on fresh renders of seen and of held-out colour-shape combinations.")
    e.add_argument("model", help="captioning run or built-in model")
    e.add_argument("--n", type=int, default=1000, help="images (shapes: per split, at most 500)")
    e.add_argument("--beams", type=int, default=1)
    e.set_defaults(func=_caption_eval)


def _caption(a) -> int:
    from aigckit.errors import AigcError
    from aigckit.multimodal.caption import load_captioner
    from aigckit.multimodal.io import read_images

    if not a.images:
        raise AigcError("give one or more IMAGE files (train a model with `aigc caption-train`)", param="image")
    from aigckit.multimodal.io import is_grey

    groups: dict[str, list[int]] = {}
    for i, path in enumerate(a.images):
        name = a.model if a.model != "auto" else ("fmnist-caption" if is_grey(path) else "shapes-caption")
        groups.setdefault(name, []).append(i)
    caps = [""] * len(a.images)
    for name, idx in groups.items():
        model, _ = load_captioner(name)
        x = read_images([a.images[i] for i in idx], model.cfg.resolution, model.cfg.channels)
        for i, c in zip(idx, model.describe(x, beams=a.beams, temperature=a.temperature, seed=a.seed)):
            caps[i] = c
    if a.json:
        print(json.dumps([{"image": i, "caption": c} for i, c in zip(a.images, caps)], indent=2))
    else:
        for i, c in zip(a.images, caps):
            print(f"{i}: {c}")
    return 0


def _caption_train(a) -> int:
    from aigckit.train.caption import CaptionTrainArgs, train_captioner

    final = train_captioner(CaptionTrainArgs(out=a.out, data=a.data, steps=a.steps, minutes=a.minutes,
                                             batch_size=a.batch_size, size=a.size, threads=a.threads,
                                             eval_n=a.eval_n, decoder=a.decoder, lm=a.lm,
                                             prefix_len=a.prefix_len, lr=a.lr), progress=not a.quiet)
    print(final)
    return 0


def _caption_eval(a) -> int:
    from aigckit.errors import AigcError
    from aigckit.multimodal.caption import load_captioner
    from aigckit.train.caption import evaluate_captioner, evaluate_shapes_captioner

    if a.n < 1:
        raise AigcError(f"n must be >= 1, got {a.n}", param="n")
    model, config = load_captioner(a.model)
    if config.get("data", {}).get("name") == "shapes":
        rep = evaluate_shapes_captioner(model, n=min(a.n, 500), beams=a.beams)
    else:
        rep = evaluate_captioner(model, n=a.n, beams=a.beams)
    print(json.dumps(rep, indent=2))
    return 0
