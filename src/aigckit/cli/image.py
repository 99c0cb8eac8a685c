"""`aigc image train | sample | interpolate | eval | train-classifier`: image generation (parsing only)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("image", help="GAN / VAE / diffusion image models: train, sample, evaluate",
                       description="Image generation on Fashion-MNIST or your image folders.")
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", parser_class=type(p))

    t = isub.add_parser("train", help="train (or --resume) a dcgan, vae, ddpm, ldm or autoencoder run",
                        description="Train (or --resume) a run. Data-parallel under torchrun, e.g. `torchrun "
                                    "--standalone --nproc-per-node 2 -m aigckit image train ...`: gloo on the CPU, "
                                    "rank 0 writes metrics, grids and checkpoints; a run resumes on another number "
                                    "of ranks with the same global batch (see docs/DISTRIBUTED.md).")
    t.add_argument("--model",
                   help="(required unless --resume) dcgan | vae | ddpm | ldm (latent diffusion, with --condition "
                   "text: an autoencoder first, then the text-conditioned UNet on its latents) | autoencoder (the "
                   "first stage of ldm)")
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist or an image-folder URL (fsspec)")
    t.add_argument("--out", required=True, help="run folder (runs/NAME)")
    t.add_argument("--steps", type=int, help="stop after N optimiser steps")
    t.add_argument("--minutes", type=float, 
                   help="stop after M minutes of training steps (grids and checkpoints not counted)")
    t.add_argument("--conditional", action="store_true", help="class-conditional model (labelled data)")
    t.add_argument("--condition", default="", choices=["", "class", "text"],
                   help="class (= --conditional) or text: a prompt-conditioned ddpm (cross-attention to MiniLM) on "
                   "captioned data: --data fashion-mnist-captions | shapes")
    t.add_argument("--batch-size", type=int, default=64, help="images per step (per rank under torchrun)")
    t.add_argument("--lr", type=float, help="learning rate (default: the family's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--size", default="small", help="model size preset: tiny | mini (ddpm, ldm) | "
                   "small | base")
    t.add_argument("--resolution", type=int, help="image size (default: the data's)")
    t.add_argument("--channels", type=int, choices=[1, 3], help="1 = grayscale, 3 = RGB (default: the data's)")
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--ckpt-every", type=int, default=250, help="checkpoint every K steps")
    t.add_argument("--sample-every", type=int, default=1000, help="sample grid + curves every K steps")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--grid-n", type=int, default=64)
    t.add_argument("--threads", type=int,
                   help="torch CPU threads (per rank under torchrun; default there: usable cores / ranks per node)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: CPU autocast")
    t.add_argument("--schedule", default="cosine", help="ddpm noise schedule: linear | cosine")
    t.add_argument("--prediction", default="eps", help="ddpm target: eps | v")
    t.add_argument("--timesteps", type=int, default=1000, help="ddpm T")
    t.add_argument("--label-dropout", type=float, default=0.1, help="ddpm: p(drop label) for guidance")
    t.add_argument("--min-snr-gamma", type=float, default=0.0, metavar="G",
                   help="ddpm / ldm: weight each image's loss by min(SNR, G) / SNR (Min-SNR-G; 5 is the paper's "
                   "choice), so the nearly noise-free steps do not dominate; 0 (default): the simple loss")
    t.add_argument("--beta", type=float, default=1.0, help="vae: KL weight")
    t.add_argument("--latent-dim", type=int, help="vae latent size / dcgan nz / autoencoder latent channels")
    t.add_argument("--kl-weight", type=float, default=1e-5,
                   help="autoencoder: KL weight per latent element (small: detailed latents; default 1e-5)")
    t.add_argument("--vae", metavar="RUN", help="ldm: a trained autoencoder run (aigc image train --model "
                   "autoencoder) to use, frozen; default: train one first into OUT/autoencoder")
    t.add_argument("--vae-steps", type=int, default=1000, help="ldm without --vae: autoencoder training steps")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    s = isub.add_parser("sample", help="generate images from a trained run (or a built-in model: fmnist-t2i, "
                        "shapes-t2i)")
    s.add_argument("run", help="run folder, checkpoint folder or built-in model name")
    s.add_argument("--prompt", action="append", help="text-conditioned models: the prompt (repeat for several; "
                   "--n is split evenly, one grid row per prompt)")
    s.add_argument("--negative-prompt", help="text-conditioned models: what guidance steers away from")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", required=True, help="grid PNG path, or a folder with --per-image")
    s.add_argument("--per-image", action="store_true", help="one PNG per image into the folder --out")
    s.add_argument("--class", dest="cls", help="class name or index (conditional runs); 'all' cycles classes")
    s.add_argument("--sampler", default="ddim", help="ddpm | ddim (diffusion)")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 3 when a class is given)")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="VAE/GAN: latent noise scale (default 1; below 1 gives cleaner, less varied samples)")
    s.add_argument("--seed", type=int)
    s.add_argument("--nrow", type=int)
    s.add_argument("--weights", default="ema", choices=["ema", "model"])
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="diffusion network dtype")
    s.set_defaults(func=_sample)

    an = isub.add_parser("animate", help="text-to-image: walk between prompts into an animated GIF/WebP")
    an.add_argument("run", help="text-conditioned run or built-in model (fmnist-t2i, shapes-t2i)")
    an.add_argument("--prompt", action="append", required=True, help="a prompt (repeat: at least two)")
    an.add_argument("--negative-prompt")
    an.add_argument("--frames", type=int, default=16, help="frames per leg between two prompts")
    an.add_argument("--fps", type=int, default=8)
    an.add_argument("--guidance", type=float, default=3.0)
    an.add_argument("--steps", type=int, default=30, help="DDIM steps per frame")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--out", required=True, help="a.gif or a.webp (frames also as PNGs in A_frames/)")
    an.set_defaults(func=_animate)

    i = isub.add_parser("interpolate", help="walk the latent space of a vae or dcgan run")
    i.add_argument("run")
    i.add_argument("--steps", type=int, default=10)
    i.add_argument("--rows", type=int, default=4, help="number of interpolations (one per row)")
    i.add_argument("--out", required=True)
    i.add_argument("--class", dest="cls")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=_interpolate)

    e = isub.add_parser("eval", help="classifier-FID/KID of a run against Fashion-MNIST, with the real-data floor")
    e.add_argument("run", help="run folder (its latest checkpoint) or a checkpoint folder")
    e.add_argument("--n", type=int, default=10000, help="generated samples to score (default 10000; the floor uses "
                   "as many held-out test images, at most 10000)")
    e.add_argument("--sampler", default="ddim", help="diffusion sampler: ddim or ddpm (default ddim)")
    e.add_argument("--steps", type=int, default=50, help="diffusion sampling steps (default 50)")
    e.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    e.add_argument("--phrasings", choices=["held-out", "training"], default="held-out",
                   help="text-to-image runs: prompts from the held-out phrasings (default) or the training captions; "
                        "classes in turn either way")
    e.add_argument("--guidance", type=float, help="classifier-free guidance scale for conditional diffusion runs")
    e.add_argument("--temperature", type=float, default=1.0, help="VAE/GAN latent noise scale (default 1)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="diffusion network dtype")
    e.add_argument("--copies-grid", default=None, metavar="PNG",
                   help="write the closest (generated, nearest training image) pairs as a grid (memorisation)")
    e.set_defaults(func=_eval)

    c = isub.add_parser("train-classifier", help="train the Fashion-MNIST classifier used by eval (deterministic)")
    c.add_argument("--epochs", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--force", action="store_true", help="retrain even if it is in the store")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_train_classifier)

    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _train(a) -> int:
    from aigckit.errors import AigcError
    from aigckit.train.loop import TrainArgs, resume_args, train

    if a.resume:  # the run's own options; only the stopping rule and the threads may change
        args = resume_args(a.out, steps=a.steps, minutes=a.minutes, threads=a.threads)
        if a.model is not None and a.model != args.model:
            raise AigcError(f"{a.out} is a {args.model} run, not {a.model}", param="model")
    elif a.model is None:
        raise AigcError("give --model (dcgan, vae, ddpm, ldm or autoencoder), or --resume an existing run",
                        param="model")
    else:
        args = TrainArgs(model=a.model, out=a.out, data=a.data, steps=a.steps, minutes=a.minutes,
                         conditional=a.conditional, condition=a.condition, batch_size=a.batch_size, lr=a.lr,
                         seed=a.seed, size=a.size, resolution=a.resolution, channels=a.channels,
                         ema_decay=a.ema_decay, ckpt_every=a.ckpt_every, sample_every=a.sample_every,
                         log_every=a.log_every, grid_n=a.grid_n, threads=a.threads,
                         schedule=a.schedule, prediction=a.prediction, timesteps=a.timesteps,
                         label_dropout=a.label_dropout, beta=a.beta, latent_dim=a.latent_dim, dtype=a.dtype,
                         kl_weight=a.kl_weight, vae=a.vae, vae_steps=a.vae_steps, min_snr_gamma=a.min_snr_gamma)
    final = train(args, resume=a.resume, progress=not a.quiet)
    print(final)
    return 0


def _sample(a) -> int:
    from aigckit.image.api import load_image_model

    m = load_image_model(a.run, weights=a.weights)
    cls = a.cls
    if cls is not None and cls.lstrip("-").isdigit():
        cls = int(cls)
    out = m.sample(a.n, classes=cls, seed=a.seed, sampler=a.sampler, steps=a.steps, eta=a.eta,
                   guidance=a.guidance, progress=sys.stderr.isatty(), dtype=a.dtype, temperature=a.temperature,
                   prompts=a.prompt, negative_prompt=a.negative_prompt)
    nrow = a.nrow or (a.n // len(a.prompt) if a.prompt and len(a.prompt) > 1 else None)
    paths = out.save(a.out, per_image=a.per_image, nrow=nrow)
    print(a.out if not a.per_image else f"{len(paths)} images in {a.out}")
    return 0


def _animate(a) -> int:
    from aigckit.image.api import load_image_model
    from aigckit.multimodal.animate import animate, save_animation

    m = load_image_model(a.run)
    frames, params = animate(m, a.prompt, frames=a.frames, seed=a.seed, guidance=a.guidance, steps=a.steps,
                             negative_prompt=a.negative_prompt, progress=sys.stderr.isatty())
    written = save_animation(frames, params, a.out, fps=a.fps)
    print(f"{a.out} ({len(frames)} frames; PNGs in {written[1].parent})")
    return 0


def _interpolate(a) -> int:
    import torch

    from aigckit.image.api import SampleResult, load_image_model

    m = load_image_model(a.run)
    rows = [m.interpolate(a.steps, seed=a.seed + r, classes=a.cls) for r in range(a.rows)]
    res = SampleResult(torch.cat([r.tensor for r in rows]), None, dict(rows[0].params, rows=a.rows))
    res.save(a.out, nrow=a.steps)
    print(a.out)
    return 0


def _eval(a) -> int:
    from aigckit.eval.evaluate import evaluate_run, format_report

    rep = evaluate_run(a.run, n=a.n, sampler=a.sampler, steps=a.steps, eta=a.eta, guidance=a.guidance, seed=a.seed,
                       progress=not a.json, dtype=a.dtype, temperature=a.temperature, copies_grid=a.copies_grid,
                       phrasings=a.phrasings)
    print(json.dumps(rep, indent=2) if a.json else format_report(rep))
    return 0


def _train_classifier(a) -> int:
    from aigckit.eval.classifier import train_classifier

    path = train_classifier(seed=a.seed, epochs=a.epochs, force=a.force, progress=not a.quiet)
    print(path)
    return 0
