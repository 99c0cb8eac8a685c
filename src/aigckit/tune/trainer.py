"""The loop the tuners share (SFT, DPO, GRPO/RLOO): a LoRA adapter on a frozen base, AdamW, a cosine schedule with
warm-up, progress, ``metrics.jsonl`` + ``curves.png``, held-out evaluation, atomic checkpoints and bit-exact resume.

A task (``sft.py``, ``dpo.py``, ``grpo.py``) supplies ``prepare`` (read and tokenise the data), ``step`` (forward and
backward for one optimiser step; the loop clips, steps and logs) and ``evaluate`` (held-out metrics).

Run folder (``--out RUN``)::

    RUN/config.json            the options, the LoRA config, the base model
    RUN/adapter/               the adapter in peft's layout (adapter_config.json + adapter_model.safetensors),
                               rewritten at every checkpoint and at the end: `aigc chat --adapter RUN/adapter`
    RUN/checkpoints/step-N/    LoRA weights, AdamW state, RNG states, step (train/checkpoint.py, atomic, checksummed)
    RUN/metrics.jsonl, RUN/curves.png, RUN/summary.json (held-out metrics before -> after)

Determinism: LoRA's A is drawn from a generator seeded by ``seed``; the rows of step k are a function of (seed, k)
(``data.sample_indices``); dropout draws from torch's global RNG and sampling (RL) from a seed per step; the RNG
states, AdamW's moments and the step are checkpointed. A run resumed from any checkpoint therefore ends with the
same adapter, bit for bit, as one never interrupted (same seed, CPU and thread count).

Under ``torchrun`` a task that says ``distributed = True`` (SFT, DPO, GRPO/RLOO: every task here) is data-parallel
with ``train/distributed.py``: ``--batch-size`` is per rank, each rank trains on its slice of the step's global batch
(``data.rank_rows``: rows, pairs, or prompts with their whole groups), normalises its loss by the global batch's count
(tokens, pairs, completion tokens) so that the averaged LoRA gradients (``GradAverager``) are one process's with the
global batch, metrics are the mean over ranks (a task reduces its own sums where a mean of means would be wrong),
each rank evaluates its share of the held-out rows (reduced), rank 0 alone writes. The adapter is the same on every
rank after every step (checked at each checkpoint: ``check_same``), so RL's per-rank engine copies sample from the
same policy. The global batch is kept on resume (the per-rank batch becomes global / ranks), so the data position
(``step x global batch`` samples) carries over and a run started on 2 ranks resumes on 1 and the other way. A task
without ``distributed`` refuses to start on more than one rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigckit.errors import AigcError
from aigckit.train import checkpoint as ck
from aigckit.train import distributed as dd
from aigckit.train.metrics import append_metrics, plot_curves, truncate_metrics
from aigckit.tune.data import IGNORE
from aigckit.tune.lora import (DEFAULT_TARGETS, LoraConfig, LoraState, add_lora, attach_adapter, lora_parameters,
                               lora_summary, save_adapter)


@dataclass
class TuneArgs:
    """Options every tuner shares (each trainer subclasses this with its own)."""

    data: str
    out: str
    model: str | None = None  # store name, .gguf, HF folder (default: smollm2-135m-instruct)
    steps: int = 100  # optimiser steps (the cosine schedule's length) ...
    minutes: float | None = None  # ... or stop after this much training time, whichever comes first
    lr: float = 2e-4
    warmup: int = 0  # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    max_len: int = 512  # tokens per row (longer rows are cut from the right)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    adapter: str | None = None  # start from this adapter (peft layout) instead of a fresh one
    eval_data: str | None = None  # held-out rows (default: eval_frac of --data)
    eval_frac: float = 0.1
    eval_every: int = 0  # 0 = before and after only
    ckpt_every: int = 50
    log_every: int = 1
    seed: int = 0
    threads: int | None = None

    def check(self) -> None:
        def need(ok: bool, msg: str, param: str) -> None:
            if not ok:
                raise AigcError(msg, param=param)

        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}", "steps")
        need(self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}", "minutes")
        need(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}", "lr")
        need(0 <= self.warmup, f"warmup must be >= 0, got {self.warmup}", "warmup")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}", "min_lr_ratio")
        need(1 <= self.batch_size <= 1024, f"batch_size must be in 1..1024, got {self.batch_size}", "batch_size")
        need(1 <= self.grad_accum <= 1024, f"grad_accum must be in 1..1024, got {self.grad_accum}", "grad_accum")
        need(2 <= self.max_len, f"max_len must be >= 2, got {self.max_len}", "max_len")
        need(0 <= self.eval_frac < 1, f"eval_frac must be in [0, 1), got {self.eval_frac}", "eval_frac")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}", "max_grad_norm")
        for k in ("ckpt_every", "log_every"):
            need(getattr(self, k) >= 1, f"{k} must be >= 1", k)
        need(self.eval_every >= 0, "eval_every must be >= 0", "eval_every")
        self.lora_config()

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          target_modules=self.target_modules)


def cosine_lr(step: int, args: TuneArgs) -> float:
    """Linear warm-up over ``warmup`` steps, then a half cosine from ``lr`` to ``lr * min_lr_ratio``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(1, args.steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Task(Protocol):
    kind: str  # "sft" | "dpo" | "grpo" | "rloo": written into config.json

    def prepare(self, lm, args: TuneArgs) -> None:
        """Read and tokenise the train and held-out data (errors name file:line)."""

    def step(self, lm, model, step: int, args: TuneArgs) -> dict[str, float]:
        """Forward + backward for optimiser step ``step`` (gradients accumulate in the LoRA parameters); returns
        metrics, including ``tokens`` (tokens forwarded)."""

    def evaluate(self, lm, model, args: TuneArgs) -> dict[str, float]:
        """Held-out metrics (names start with ``eval_``); {} without held-out data."""


# ------------------------------------------------------------------------------------------------ shared maths


class _HeadRows(nn.Module):
    """Stands in for ``lm_head`` for one forward: the head (None: no head, the hidden states themselves) applied only
    to the flattened positions ``index``."""

    def __init__(self, head: nn.Module | None, index: Tensor) -> None:
        super().__init__()
        self.head, self.index = head, index

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).index_select(0, self.index)
        return rows if self.head is None else self.head(rows)


def _at_labels(model, ids: Tensor, labels: Tensor, head: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
    target = labels[:, 1:]
    where = (target != IGNORE).nonzero()
    index = where[:, 0] * ids.shape[1] + where[:, 1]
    lm_head = model.lm_head
    model.lm_head = _HeadRows(head, index)
    try:
        out = model(ids)
    finally:
        model.lm_head = lm_head
    return out, target[where[:, 0], where[:, 1]], where


def label_logits(model, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logits only at the positions whose next token is labelled: ``(logits [N, V], targets [N], where [N, 2])``
    with ``where`` the (row, position) of each in ``labels[:, 1:]``. The output head is a fifth of a small model's
    FLOPs and most of its activation memory (SmolLM2: 49152 x 576), and prompts, padding and chat turns that carry
    no loss need none of it; the model itself is untouched (the head is swapped for this call only)."""
    return _at_labels(model, ids, labels, model.lm_head)


def token_logps(model, ids: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each labelled next token under ``model``: [B, T - 1] (the logits at position t score
    labels[:, t + 1]), 0 where the label is ``IGNORE``."""
    logits, target, where = label_logits(model, ids, labels)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=picked.dtype)
    return out.index_put((where[:, 0], where[:, 1]), picked)


CE_CHUNK = 256  # rows of logits at once in linear_cross_entropy (SmolLM2: 256 x 49152 float32 = 50 MB)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed ``cross_entropy(h @ W.T, target)`` for a frozen ``W``, ``CE_CHUNK`` rows at a time, the gradient of
    ``h`` computed in the same pass (``(softmax - onehot) @ W``): the [N, V] logits, their log-softmax and their
    gradient are never held whole (Liger's fused linear cross-entropy, for a frozen head)."""

    @staticmethod
    def forward(ctx, h: Tensor, W: Tensor, target: Tensor) -> Tensor:
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        total = h.new_zeros(())
        for i in range(0, h.shape[0], CE_CHUNK):
            z = F.linear(h[i:i + CE_CHUNK], W)
            t = target[i:i + CE_CHUNK]
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, t[:, None])[:, 0]).sum()
            if grad is not None:
                p = z.sub_(lse[:, None]).exp_()  # softmax, in place
                p[torch.arange(p.shape[0]), t] -= 1
                torch.mm(p, W, out=grad[i:i + CE_CHUNK])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None


def sum_nll(model, ids: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy of the labelled next tokens (for a mean over the tokens of several micro-batches). With
    a frozen float32 head (LoRA training) the head and the loss run fused and chunked (``_LinearCrossEntropy``)."""
    head = model.lm_head
    if (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
            and head.weight.dtype == torch.float32):
        h, target, _ = _at_labels(model, ids, labels, None)
        return _LinearCrossEntropy.apply(h, head.weight, target)
    logits, target, _ = label_logits(model, ids, labels)
    return F.cross_entropy(logits.float(), target, reduction="sum")


# ------------------------------------------------------------------------------------------------ the run


def load_base(args: TuneArgs, threads: int | None = None):
    """The base model for training: float32, plain torch linears (gradients flow through the reference path)."""
    from aigckit.text.lm import load_lm

    return load_lm(args.model, kernels="torch", threads=threads or args.threads)


def train(task: Task, args: TuneArgs, *, resume: bool = False, progress: bool = True,
          stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) ``task`` in ``args.out``; returns the summary (held-out metrics before and after, timing).
    ``stop_at``: leave after this step as if interrupted (checkpoint written, no final evaluation). Under torchrun
    every rank calls this (see the module docstring)."""
    with dd.session() as d:
        return _train(task, args, d, resume=resume, progress=progress, stop_at=stop_at)


def _train(task: Task, args: TuneArgs, d: dd.Dist, *, resume: bool, progress: bool, stop_at: int | None):
    from tqdm import tqdm

    run = Path(args.out).expanduser()
    ckpt = None
    if d.active and not getattr(task, "distributed", False):
        raise AigcError(f"{task.kind} does not run data-parallel yet: start it without torchrun (or with "
                        "--nproc-per-node 1)", param="nproc_per_node")
    if resume:
        if ck.list_checkpoints(run):
            ckpt = ck.latest_checkpoint(run)
            saved_config = ck.read_config(ckpt)
        elif (run / "config.json").exists():
            saved_config = ck.read_config(run)
        else:
            raise AigcError(f"nothing to resume in {run}: no checkpoint and no config.json", param="resume")
        saved = saved_config["args"]
        # only the stopping rule, the threads and the folder may change on resume; the global batch is kept
        saved.update(steps=args.steps, minutes=args.minutes, threads=args.threads, out=args.out)
        saved["batch_size"] = dd.resumed_batch(saved["batch_size"],
                                               saved_config.get("distributed", {}).get("world_size", 1), d)
        args = _args_from_dict(type(args), saved)
    elif ck.list_checkpoints(run):
        raise AigcError(f"{run} already holds a run; pass --resume to continue it or choose another --out",
                        param="out")
    args.check()
    lm = load_base(args, dd.threads_per_rank(args.threads, d))
    model = lm.model
    if args.adapter:
        lcfg = attach_adapter(model, args.adapter)
    else:
        lcfg = args.lora_config()
        add_lora(model, lcfg, torch.Generator().manual_seed(args.seed))
    task.dist = d
    task.prepare(lm, args)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    torch.manual_seed(dd.rank_seed(args.seed + 1, d.rank))  # dropout; rank 0's is the single-process seed
    step, train_time, tokens_seen = 0, 0.0, 0
    global_batch = args.batch_size * args.grad_accum * d.world_size
    config = {"kind": task.kind, "args": asdict(args), "lora": asdict(lcfg), "base": {"name": lm.name,
              "source": lm.source}, "lora_summary": lora_summary(model),
              "distributed": {"world_size": d.world_size, "global_batch": global_batch}}
    if ckpt is not None:
        ck.load_weights(LoraState(model), ckpt / "model.safetensors")
        tensors, meta = ck.load_trainer_state(ckpt)
        ck.optimizer_from_flat({"adamw": opt}, tensors, meta["optimizers"])
        suffix = f".rank{d.rank}" if d.rank else ""
        if f"rng.torch{suffix}" in tensors:
            torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        else:  # a rank the saving run did not have: a fresh stream fixed by (seed, rank, step)
            torch.manual_seed(dd.rank_seed(args.seed * 1_000_003 + meta["step"], d.rank))
        step, train_time, tokens_seen = meta["step"], meta["train_time_s"], meta["tokens_seen"]
        if d.is_main:
            truncate_metrics(run, step)
    dd.broadcast_module(LoraState(model), d)
    averager = dd.GradAverager(model, d)
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if ckpt is not None and summary_path.exists() else {}
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        ck.atomic_write_text(run / "config.json", json.dumps(config, indent=2))

    def save() -> None:
        dd.check_same(params, d, "the LoRA weights")
        rng = {"torch": torch.get_rng_state()}
        if d.active:  # every rank's stream, so that a resume on as many ranks is bit for bit
            states = dd.gather_bytes(rng["torch"], d)
            rng = {f"torch.rank{r}" if r else "torch": states[r] for r in range(d.world_size)}
        if not d.is_main:
            return
        ck.save_checkpoint(run, step=step, config=config, model=LoraState(model), optimizers={"adamw": opt},
                           rng=rng, state={"train_time_s": train_time, "tokens_seen": tokens_seen,
                                           "data_samples": step * global_batch})
        save_adapter(model, run / "adapter", lcfg, lm.source)

    def evaluate(when: str | None = None) -> dict[str, float]:
        """Every rank calls it (a distributed task evaluates its share and reduces); rank 0 writes the result."""
        model.eval()
        rng = torch.get_rng_state()  # evaluation never moves the training RNG
        with torch.no_grad():
            out = task.evaluate(lm, model, args)
            if when and hasattr(task, "samples"):  # generated examples, before and after (RL)
                summary[f"samples_{when}"] = task.samples(lm, model, args)
        torch.set_rng_state(rng)
        return out

    if dd.any_rank("before" not in summary and d.is_main, d):  # rank 0's summary decides, for every rank
        summary["before"] = evaluate("before")
        if d.is_main:
            if summary["before"]:
                append_metrics(run, {"step": step, **summary["before"]})
            ck.atomic_write_text(summary_path, json.dumps(summary, indent=2))  # a resumed run keeps "before"
    stop_requested: list[int] = []
    old_term = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(1))
    bar = tqdm(total=args.steps, initial=step, desc=f"{task.kind}", unit="step",
               disable=not progress or not d.is_main, dynamic_ncols=True, file=sys.stderr)
    last_saved = step if ckpt is not None else -1
    out_of_time = False
    try:
        while step < args.steps and step != stop_at:
            timed_out = args.minutes is not None and train_time >= args.minutes * 60
            if dd.any_rank(timed_out or bool(stop_requested), d):  # every rank stops at the same step
                out_of_time = dd.any_rank(timed_out, d)
                break
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, args)
            model.train()
            opt.zero_grad(set_to_none=True)
            metrics = task.step(lm, model, step, args)
            if d.active:  # means over ranks; counts are sums
                metrics = {k: v * d.world_size if k in ("tokens", "loss_tokens") else v
                           for k, v in dd.mean_over_ranks(metrics, d).items()}
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm
                                                              else float("inf")))
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            train_time += dt
            tokens_seen += int(metrics.get("tokens", 0))
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                row = {"step": step, "time": round(train_time, 2), "lr": opt.param_groups[0]["lr"],
                       "grad_norm": round(grad_norm, 6), "tokens_per_s": round(metrics.get("tokens", 0) / dt, 1),
                       **{k: v for k, v in metrics.items() if k != "tokens"}}
                if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                    row.update(evaluate())
                if d.is_main:
                    append_metrics(run, row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "reward", "tokens_per_s") if k in row})
            if step % args.ckpt_every == 0:
                save()
                last_saved = step
    except KeyboardInterrupt:
        bar.close()
        if step != last_saved:
            save()
        raise
    finally:
        dd.restore_sigterm(old_term)
        bar.close()
        averager.remove()
    if step != last_saved:
        save()
    if step < args.steps and not out_of_time:
        # interrupted: the checkpoint is written, the run goes on with --resume
        return {**summary, "steps": step, "interrupted": True}
    summary["after"] = evaluate("after")
    summary.update(steps=step, train_time_s=round(train_time, 2), tokens_seen=tokens_seen,
                   tokens_per_s=round(tokens_seen / max(train_time, 1e-9), 1), adapter=str(run / "adapter"))
    if d.is_main:
        if summary["after"]:
            append_metrics(run, {"step": step, **summary["after"]})
        ck.atomic_write_text(summary_path, json.dumps(summary, indent=2))
        plot_curves(run)
    dd.barrier(d, "waiting for rank 0 to write the run")
    return summary


def _args_from_dict(cls: type, d: dict) -> TuneArgs:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise AigcError(f"unknown options in the run's config.json: {', '.join(sorted(unknown))}", param="resume")
    return cls(**d)
