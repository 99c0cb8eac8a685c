"""The shared training loop of ``aigc image train``: data order, progress, metrics, grids, checkpoints, resume.

A model family supplies a small trainer object (``train/diffusion.py``, ``train/vae.py``, ``train/gan.py``) that
satisfies ``train.family.FamilyTrainer``: ``build``, ``optimizers``, ``step`` and ``grid``.

Resume (``--resume``) continues from the newest intact checkpoint: one that fails its checksums (truncated, damaged)
is skipped with a warning naming it, and the run goes on from the one before.

Determinism: the model is initialised from ``seed``; batch order is a permutation per epoch drawn from a generator
seeded by (seed, epoch), so it depends only on the step; all training noise comes from one ``torch.Generator`` whose
state is checkpointed with the global torch RNG, the optimisers and the EMA. Hence a run resumed from any checkpoint
ends with the same weights, bit for bit, as one that was never interrupted (same seed, CPU, same thread count).

Under ``torchrun`` the same loop is data-parallel (``train/distributed.py``): ``--batch-size`` is per rank, the data
position is kept in samples and the global batch (per-rank batch x ranks) is kept on resume, so a run started on 2
ranks resumes on 1 (with twice the per-rank batch) and the other way; every rank's RNG states are checkpointed, so a
resume on the same number of ranks is bit for bit too. Rank 0 writes metrics, grids and checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aigckit.data.images import load_dataset, to_float
from aigckit.errors import AigcError
from aigckit.train import checkpoint as ck
from aigckit.train import distributed as dd
from aigckit.train.ema import make_ema, update_ema
from aigckit.train.family import FamilyTrainer
from aigckit.train.metrics import append_metrics, plot_curves, truncate_metrics

FAMILIES = {"ddpm": "aigckit.train.diffusion", "vae": "aigckit.train.vae", "dcgan": "aigckit.train.gan",
            "autoencoder": "aigckit.train.autoencoder", "ldm": "aigckit.train.ldm"}
TEXT_FAMILIES = {"ddpm": "aigckit.train.t2i", "ldm": "aigckit.train.ldm"}  # --condition text
TEXT_ONLY = ("ldm",)  # families that exist only text-conditioned


@dataclass
class TrainArgs:
    model: str  # ddpm | vae | dcgan | autoencoder | ldm
    out: str
    data: str = "fashion-mnist"
    steps: int | None = None  # stop after this many optimiser steps ...
    minutes: float | None = None  # ... or after this much training time (whichever comes first)
    conditional: bool = False
    condition: str = ""  # "" (none, or class with --conditional) | "text" (captioned data, cross-attention)
    batch_size: int = 64
    lr: float | None = None  # None: the family's default
    seed: int = 0
    size: str = "small"  # model size preset of the family: tiny | small | base
    resolution: int | None = None  # None: the family preset's (28 for Fashion-MNIST)
    channels: int | None = None  # None: the data's
    ema_decay: float = 0.999
    ckpt_every: int = 250
    sample_every: int = 1000
    log_every: int = 50
    grid_n: int = 64  # images in the periodic sample grids
    threads: int | None = None
    dtype: str = "float32"  # float32 | bfloat16 (CPU autocast: ~1.5x faster on CPUs with AVX512-BF16/AMX)
    # family options (ignored by families that do not use them)
    schedule: str = "cosine"  # ddpm
    prediction: str = "eps"  # ddpm
    timesteps: int = 1000  # ddpm
    label_dropout: float = 0.1  # ddpm (classifier-free guidance)
    min_snr_gamma: float = 0.0  # ddpm / ldm: Min-SNR-γ loss weighting (0: the simple loss)
    grid_steps: int = 50  # ddpm: DDIM steps for the periodic grids
    beta: float = 1.0  # vae
    latent_dim: int | None = None  # vae / dcgan (nz) / autoencoder (latent channels)
    kl_weight: float = 1e-5  # autoencoder (and the one an ldm run trains first)
    vae: str | None = None  # ldm: a trained autoencoder run to use (None: train one first into OUT/autoencoder)
    vae_steps: int = 1000  # ldm without --vae: steps of that first stage (about 12 minutes on 2 busy cores)

    def __post_init__(self) -> None:
        if self.model not in FAMILIES:
            raise AigcError(f"unknown model {self.model!r}; known: {', '.join(FAMILIES)}")
        if self.steps is None and self.minutes is None:
            raise AigcError("give --steps N or --minutes M")
        if self.steps is not None and self.steps < 0:
            raise AigcError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.batch_size > 4096:
            raise AigcError(f"batch size must be in 1..4096, got {self.batch_size}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise AigcError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise AigcError(f"ema decay must be in [0, 1), got {self.ema_decay}")
        if self.condition not in ("", "class", "text"):
            raise AigcError(f"condition must be class or text, got {self.condition!r}", param="condition")
        if self.condition == "text" and self.model not in TEXT_FAMILIES:
            raise AigcError(f"--condition text works with --model {', '.join(TEXT_FAMILIES)}, not {self.model}",
                            param="condition")
        if self.model in TEXT_ONLY and self.condition != "text":
            raise AigcError(f"--model {self.model} is text-to-image only: add --condition text "
                            "(and --data fashion-mnist-captions or shapes)", param="condition")
        if self.vae is not None and self.model != "ldm":
            raise AigcError(f"--vae applies to --model ldm, not {self.model}", param="vae")
        if self.vae_steps < 1:
            raise AigcError(f"vae steps must be >= 1, got {self.vae_steps}", param="vae_steps")
        if self.kl_weight < 0:
            raise AigcError(f"kl weight must be >= 0, got {self.kl_weight}", param="kl_weight")
        if self.condition == "class":
            self.conditional = True
        if self.condition == "text" and self.conditional:
            raise AigcError("--conditional (class labels) and --condition text exclude each other", param="condition")
        if self.dtype not in ("float32", "bfloat16"):
            raise AigcError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.latent_dim is not None and self.latent_dim < 1:
            raise AigcError(f"latent dim must be >= 1, got {self.latent_dim}")
        for k in ("ckpt_every", "sample_every", "log_every"):
            if getattr(self, k) < 1:
                raise AigcError(f"{k} must be >= 1")


def family_trainer(name: str, condition: str = "") -> FamilyTrainer:
    if name not in FAMILIES:
        raise AigcError(f"unknown model {name!r}; known: {', '.join(FAMILIES)}")
    if condition == "text":
        return importlib.import_module(TEXT_FAMILIES[name]).Trainer()
    if name in TEXT_ONLY:
        raise AigcError(f"--model {name} needs --condition text", param="condition")
    return importlib.import_module(FAMILIES[name]).Trainer()


def train(args: TrainArgs, *, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the run in ``args.out``; returns the folder of the final checkpoint. Under torchrun every
    rank calls this (see ``train/distributed.py``)."""
    with dd.session() as d:
        return _train(args, d, resume=resume, progress=progress)


def _saved_run(run: Path) -> tuple[Path | None, dict]:
    """The checkpoint to resume from (None: the run was killed before its first one) and its config."""
    if ck.list_checkpoints(run):
        ckpt = ck.latest_checkpoint(run)  # the newest intact one; damaged newer ones are named on stderr
        return ckpt, ck.read_config(ckpt)
    if (run / "config.json").exists():  # killed before its first checkpoint: start it again from step 0
        return None, ck.read_config(run)
    raise AigcError(f"nothing to resume in {run}: no checkpoint and no config.json", param="out")


def resume_args(out: str, *, steps: int | None, minutes: float | None, threads: int | None) -> TrainArgs:
    """The options a run was started with, under a new stopping rule and thread count: what ``--resume`` trains
    with (the other options cannot change mid-run)."""
    return args_from_dict(_restarted(_saved_run(Path(out).expanduser())[1]["train"], steps, minutes, threads, out))


def _restarted(saved: dict, steps: int | None, minutes: float | None, threads: int | None, out: str) -> dict:
    """Only the stopping rule, the threads (and the folder, if the run was moved) may change on resume."""
    return {**saved, "steps": steps, "minutes": minutes, "threads": threads, "out": out}


def _resumed_args(saved: dict, saved_config: dict, args: TrainArgs, d: dd.Dist) -> TrainArgs:
    """The saved options with the new stopping rule, threads and folder; the per-rank batch keeps the global one."""
    saved = _restarted(saved, args.steps, args.minutes, args.threads, args.out)
    saved["batch_size"] = dd.resumed_batch(saved["batch_size"], saved_config.get("distributed", {}).get("world_size", 1),
                                           d)
    return args_from_dict(saved)


def _train(args: TrainArgs, d: dd.Dist, *, resume: bool, progress: bool) -> Path:
    from tqdm import tqdm

    run = Path(args.out).expanduser()
    ckpt = None
    if resume:
        ckpt, saved_config = _saved_run(run)
        args = _resumed_args(saved_config["train"], saved_config, args, d)
    elif ck.list_checkpoints(run):
        raise AigcError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    threads = dd.threads_per_rank(args.threads, d)
    if threads:
        torch.set_num_threads(threads)
    trainer = family_trainer(args.model, args.condition)
    if hasattr(trainer, "dataset"):  # a family with its own data (captioned images for --condition text)
        ds = trainer.dataset(args)
    else:
        ds = load_dataset(args.data, "train", args.resolution or trainer.default_resolution(args), args.channels)
    if args.conditional and ds.labels is None:
        raise AigcError(f"--conditional needs labelled data; {args.data} has no class sub-folders")
    if len(ds) < args.batch_size * d.world_size:
        what = f"batch size {args.batch_size}" + (f" x {d.world_size} ranks" if d.active else "")
        raise AigcError(f"{what} exceeds the {len(ds)} training images")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    cfg, model = trainer.build(args, ds)
    ema = make_ema(model)
    opts = trainer.optimizers(model, args)
    seed = dd.rank_seed(args.seed, d.rank)
    if d.rank:
        torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    step, images_seen, train_time = 0, 0, 0.0
    data_pos = {"epoch": 0, "offset": 0}
    config = {"family": args.model, "model": cfg.to_dict(), "train": asdict(args),
              "data": {"name": ds.name, "class_names": ds.class_names if args.conditional else [],
                       "resolution": ds.resolution, "channels": ds.channels},
              "distributed": {"world_size": d.world_size, "global_batch": args.batch_size * d.world_size}}
    if hasattr(trainer, "run_info"):  # e.g. an ldm run's autoencoder: where from, how well it reconstructs
        config.update(trainer.run_info())
    if ckpt is not None:
        ck.load_weights(model, ckpt / "model.safetensors")
        ck.load_weights(ema, ckpt / "ema.safetensors")
        tensors, meta = ck.load_trainer_state(ckpt)
        ck.optimizer_from_flat(opts, tensors, meta["optimizers"])
        step, images_seen, train_time = meta["step"], meta["images_seen"], meta["train_time_s"]
        suffix = f".rank{d.rank}" if d.rank else ""
        if f"rng.train{suffix}" in tensors:
            gen.set_state(tensors[f"rng.train{suffix}"])
            torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        else:  # a rank the saving run did not have: fresh streams, fixed by (seed, rank, step)
            torch.manual_seed(dd.rank_seed(args.seed * 1_000_003 + step, d.rank))
            gen.manual_seed(dd.rank_seed(args.seed * 1_000_003 + step, d.rank) + 1)
        if "data_offset" in meta:
            data_pos = {"epoch": meta["data_epoch"], "offset": meta["data_offset"]}
        else:  # written before the position was kept in samples: one process, a fixed batch
            per_epoch = len(ds) // args.batch_size
            data_pos = {"epoch": step // per_epoch, "offset": (step % per_epoch) * args.batch_size}
        if d.is_main:
            truncate_metrics(run, step)
    dd.broadcast_module(model, d)
    dd.broadcast_module(ema, d)
    averager = dd.GradAverager(model, d)
    sampler = dd.ShardedSampler(len(ds), args.batch_size, args.seed, d, **data_pos)
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        ck.atomic_write_text(run / "config.json", json.dumps(config, indent=2))

    def save() -> Path:
        rng = {"train": gen.get_state(), "torch": torch.get_rng_state()}
        if d.active:  # every rank's streams, so that a resume on as many ranks is bit for bit
            states = {k: dd.gather_bytes(v, d) for k, v in rng.items()}
            rng = {f"{k}.rank{r}" if r else k: v[r] for k, v in states.items() for r in range(d.world_size)}
        path = run / ck.CKPT_DIR / f"{ck.PREFIX}{step:09d}"
        if d.is_main:
            path = ck.save_checkpoint(run, step=step, config=config, model=model, ema=ema, optimizers=opts, rng=rng,
                                      state={"images_seen": images_seen, "train_time_s": train_time,
                                             **sampler.state()})
        return path

    def grid() -> None:
        if not d.is_main:
            return
        g = torch.Generator().manual_seed(1234)  # fixed: grids are comparable across steps, training RNG untouched
        labels = (torch.arange(args.grid_n) % ds.num_classes) if args.conditional else None
        imgs = trainer.grid(ema, args, labels, g)
        from aigckit.image.io import make_grid, save_png

        nrow = ds.num_classes if args.conditional and ds.num_classes <= 16 else getattr(trainer, "grid_nrow", None)
        meta = {"model": args.model, "run": str(run), "step": step, "seed": 1234}
        save_png(make_grid(imgs, nrow=nrow), run / "samples" / f"step-{step:09d}.png", meta)
        save_png(make_grid(imgs, nrow=nrow), run / "samples.png", meta)

    X, Y = ds.images, ds.labels
    stop_requested = []
    old_term = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(1))
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.model}", unit="step",
               disable=not progress or not d.is_main, dynamic_ncols=True)
    sums: dict[str, float] = {}
    dt_log, n_log, k_log = 0.0, 0, 0  # training seconds, images and steps since the last log row
    last_saved = step if ckpt is not None else -1
    try:
        while True:
            if args.steps is not None and step >= args.steps:
                break
            out_of_time = args.minutes is not None and train_time >= args.minutes * 60
            if dd.any_rank(out_of_time or bool(stop_requested), d):  # all ranks stop at the same step
                break
            t0 = time.perf_counter()
            idx = sampler.next()
            x = trainer.inputs(idx) if hasattr(trainer, "inputs") else to_float(X[idx])  # ldm: cached latents
            y = Y[idx] if args.conditional or args.condition == "text" else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                losses = trainer.step(model, opts, x, y, gen)
            update_ema(ema, model, args.ema_decay, step)
            step += 1
            images_seen += sampler.global_batch
            dt = time.perf_counter() - t0
            train_time += dt
            dt_log += dt
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            n_log += sampler.global_batch
            k_log += 1
            bar.update(1)
            if step % args.log_every == 0:
                sums = dd.mean_over_ranks(sums, d)
                if d.is_main:
                    row = {"step": step, "epoch": round(sampler.progress, 3), "images": images_seen,
                           "time": round(train_time, 2), "images_per_s": round(n_log / max(dt_log, 1e-9), 2),
                           **{k: v / k_log for k, v in sums.items()}}
                    append_metrics(run, row)
                    bar.set_postfix({"img/s": f"{row['images_per_s']:.0f}",
                                     **{k: f"{v / k_log:.4g}" for k, v in sums.items()}})
                sums, dt_log, n_log, k_log = {}, 0.0, 0, 0
            if step % args.ckpt_every == 0:
                save()
                last_saved = step
            if step % args.sample_every == 0:
                grid()
                if d.is_main:
                    plot_curves(run)
    except KeyboardInterrupt:
        bar.close()
        if step != last_saved and not d.active:  # several ranks: the others may be gone; the last one stands
            save()
        raise
    finally:
        dd.restore_sigterm(old_term)
        bar.close()
        averager.remove()
    final = save() if step != last_saved else ck.latest_checkpoint(run) if d.is_main else \
        run / ck.CKPT_DIR / f"{ck.PREFIX}{step:09d}"
    if step > 0 and d.is_main:
        grid()
        plot_curves(run)
    dd.barrier(d, "waiting for rank 0 to write the final checkpoint")
    return final


def args_from_dict(d: dict) -> TrainArgs:
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = set(d) - names
    if unknown:
        raise AigcError(f"unknown training options: {', '.join(sorted(unknown))}")
    return TrainArgs(**d)
