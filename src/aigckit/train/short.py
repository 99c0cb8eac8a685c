"""The short loop shared by the CLIP and captioning trainers (``train/clip.py``, ``train/caption.py``): a shuffled
order per epoch, stop after ``steps`` or ``minutes`` of step time, a metrics row every ``log_every`` steps, a
checkpoint every ``ckpt_every`` steps and at the end. (Image-generation families use ``train/loop.py``: EMA, grids,
bit-exact resume.)"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from aigckit.errors import AigcError
from aigckit.train import checkpoint as ck


def start_run(out: str, config: dict) -> Path:
    run = Path(out).expanduser()
    if ck.list_checkpoints(run):
        raise AigcError(f"{run} already holds a run; choose another --out", param="out")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config, indent=2))
    return run


def run_steps(run: Path, args, config: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, n: int,
              batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], *, desc: str,
              progress: bool = True, clip_grad: float | None = None) -> tuple[Path, int, float]:
    """Train until ``args.steps`` / ``args.minutes``; ``batch_loss(indices, gen)`` gives the loss of one batch of
    the n examples. Returns (final checkpoint, steps, training seconds)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed + 1)
    step, train_time, per_epoch, order = 0, 0.0, n // args.batch_size, None
    bar = tqdm(total=args.steps, desc=desc, disable=not progress)
    while (args.steps is None or step < args.steps) and (args.minutes is None or train_time < args.minutes * 60):
        t0 = time.perf_counter()
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[(step % per_epoch) * args.batch_size:(step % per_epoch + 1) * args.batch_size]
        model.train()
        loss = batch_loss(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
        step += 1
        train_time += time.perf_counter() - t0
        bar.update(1)
        if step % args.log_every == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "time": round(train_time, 2), "loss": loss.item(),
                                    "images_per_s": round(step * args.batch_size / train_time, 1)}) + "\n")
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.ckpt_every == 0:
            ck.save_checkpoint(run, step=step, config=config, model=model)
    bar.close()
    return ck.save_checkpoint(run, step=step, config=config, model=model), step, train_time
