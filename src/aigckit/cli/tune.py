"""`aigc finetune | dpo | rl | lora merge`: LoRA tuning from the command line (parsing only; see aigckit.tune)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from aigckit.errors import AigcError

TARGETS_HELP = ("comma-separated HF module names the adapter trains (peft's target_modules), all-linear, or "
                r"re:REGEX matched against whole HF module names, e.g. 're:model\.layers\.2\d\..*' for the "
                "top layers only (backward stops below them) (default: q_proj,k_proj,v_proj,o_proj,gate_proj,"
                "up_proj,down_proj)")


def _common(p: argparse.ArgumentParser, data_help: str, *, lr: float, steps: int, batch: int) -> None:
    p.add_argument("--model", "-m", default=None, help="base model: store name, .gguf, HF folder "
                                                        "(default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help=data_help)
    p.add_argument("--out", required=True, metavar="RUN", help="run folder: adapter/, checkpoints/, metrics.jsonl, "
                                                                "curves.png, summary.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact "
                                                         "checkpoint (bit-exact); only --steps/--threads may change")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps}): the length of "
                                                            "the cosine schedule")
    g.add_argument("--minutes", type=float, default=None, help="stop after this much training time if sooner")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g}), AdamW")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the cosine decay")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine ends at lr x this (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--batch-size", type=int, default=batch, help=f"rows per micro-batch (default {batch})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--max-len", type=int, default=512, help="tokens per row (longer rows are cut)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0, help="scale = alpha / rank")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default=None, help=TARGETS_HELP)
    g.add_argument("--adapter", default=None, metavar="DIR", help="continue training this adapter (peft layout) "
                                                                  "instead of a fresh one")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-data", default=None, metavar="FILE.jsonl", help="held-out rows (default: --eval-frac "
                                                                           "of --data, drawn by --seed)")
    g.add_argument("--eval-frac", type=float, default=0.1)
    g.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0 = before and "
                                                             "after only)")
    g.add_argument("--ckpt-every", type=int, default=50)
    g.add_argument("--log-every", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")


COMMON = ("data", "out", "model", "steps", "minutes", "lr", "warmup", "min_lr_ratio", "weight_decay", "max_grad_norm",
          "batch_size", "grad_accum", "max_len", "lora_rank", "lora_alpha", "lora_dropout", "adapter", "eval_data",
          "eval_frac", "eval_every", "ckpt_every", "log_every", "seed", "threads")


def _targets(value: str | None):
    from aigckit.tune.lora import DEFAULT_TARGETS

    if value is None:
        return list(DEFAULT_TARGETS)
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise AigcError("--target-modules is empty", param="target_modules")
    return names


def _kwargs(args, extra: tuple[str, ...]) -> dict:
    kw = {k: getattr(args, k) for k in COMMON + extra}
    kw["target_modules"] = _targets(args.target_modules)
    return kw


def _report(args, summary: dict) -> int:
    if args.json:
        print(json.dumps(summary))
        return 0
    if summary.get("interrupted"):
        print(f"stopped at step {summary['steps']}; checkpoint written: continue with --resume", file=sys.stderr)
        return 0
    before, after = summary.get("before", {}), summary.get("after", {})
    for k in sorted(set(before) | set(after)):
        b, a = before.get(k), after.get(k)
        fmt = (lambda v: "-" if v is None else f"{v:.4f}")
        print(f"{k:<24} {fmt(b)} -> {fmt(a)}")
    print(f"{summary['steps']} steps in {summary['train_time_s']:.1f} s ({summary['tokens_per_s']:.0f} tokens/s); "
          f"adapter: {summary['adapter']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning of a LoRA adapter (SFT)",
                       description="Train a LoRA adapter on JSONL rows: {\"messages\": [...]} chats (through the "
                                   "model's chat template, loss on the assistant tokens only) or {\"text\": ...}. "
                                   "The adapter lands in RUN/adapter (peft layout): aigc chat --adapter RUN/adapter. "
                                   "Data-parallel under torchrun (--batch-size per rank): torchrun --standalone "
                                   "--nproc-per-node 2 -m aigckit finetune ... (docs/DISTRIBUTED.md).")
    _common(p, "JSONL rows: {\"messages\": [{role, content}, ...]} or {\"text\": ...}; or a token-shard folder "
               "(path or fsspec URL) from aigc data tokenize --sft, read from its memory map step by step",
            lr=2e-4, steps=100, batch=4)
    p.add_argument("--packing", action="store_true", help="concatenate rows and cut into --max-len blocks")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("dpo", help="direct preference optimisation of a LoRA adapter",
                       description="DPO (Rafailov et al. 2023) on preference pairs {prompt, chosen, rejected} "
                                   "(strings, or chat messages). The reference model is the base with the adapter "
                                   "disabled (no second copy). Held-out: preference accuracy and DPO loss. "
                                   "Data-parallel under torchrun (--batch-size pairs per rank): torchrun --standalone "
                                   "--nproc-per-node 2 -m aigckit dpo ... (docs/DISTRIBUTED.md).")
    _common(p, "JSONL rows: {\"prompt\", \"chosen\", \"rejected\"}", lr=5e-5, steps=100, batch=2)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta (KL strength), default 0.1")
    p.add_argument("--loss-type", choices=["sigmoid", "ipo", "hinge"], default="sigmoid")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO's epsilon")
    p.set_defaults(func=_dpo)

    p = sub.add_parser("rl", help="reinforcement learning of a LoRA adapter (GRPO, RLOO) against rewards",
                       description="Samples --num-generations completions per prompt with the fast engine (the "
                                   "current adapter merged into a model copy each step), scores them with the reward "
                                   "functions, and takes a clipped policy-gradient step with group-normalised "
                                   "(GRPO) or leave-one-out (RLOO) advantages and a KL penalty to the base model. "
                                   "Data-parallel under torchrun (--batch-size prompts per rank, each with its whole "
                                   "group): torchrun --standalone --nproc-per-node 2 -m aigckit rl ... "
                                   "(docs/DISTRIBUTED.md).")
    _common(p, "JSONL rows: {\"prompt\": str | messages, ...columns passed to the rewards}", lr=1e-5, steps=100,
            batch=4)
    p.add_argument("--algo", choices=["grpo", "rloo"], default="grpo")
    p.add_argument("--reward", action="append", default=[], metavar="SPEC",
                   help="reward: a built-in (format:REGEX, json[:SCHEMA], length:N, brevity:N, exact[:COL], "
                        "exact-number[:COL], "
                        "similarity[:COL] (MiniLM cosine to a column), classifier:DIR[:LABEL] (probability of "
                        "LABEL under a BERT/MiniLM sequence classifier saved by transformers)) or module:function "
                        "with TRL's signature fn(prompts, completions, **columns) -> list[float]; repeatable; "
                        "SPEC=WEIGHT sets its weight, e.g. --reward exact-number=1 --reward 'format:^\\d+$=0.5'")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (the group)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04, help="KL penalty to the base model (0 = none)")
    p.add_argument("--epsilon", type=float, default=0.2, help="ratio clipping")
    p.add_argument("--eval-generations", type=int, default=1,
                   help="held-out: completions per prompt (the first greedy, the rest sampled)")
    p.set_defaults(func=_rl)

    p = sub.add_parser("lora", help="LoRA adapter tools (merge)")
    lsub = p.add_subparsers(dest="lora_command", metavar="COMMAND")
    m = lsub.add_parser("merge", help="merge an adapter into its base weights and save an HF folder",
                        description="Writes OUT/config.json + model.safetensors (HF Llama/GPT-2 names) + the "
                                    "tokenizer files: a plain model that loads anywhere (aigc, transformers).")
    m.add_argument("--model", "-m", default=None, help="the base model the adapter was trained on")
    m.add_argument("--adapter", required=True, metavar="DIR")
    m.add_argument("--out", required=True, metavar="DIR")
    m.set_defaults(func=_merge)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _run(task, args_obj, args) -> int:
    from aigckit.tune.trainer import train

    summary = train(task, args_obj, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty())
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports
        return 0
    return _report(args, summary)


def _finetune(args) -> int:
    from aigckit.tune.sft import SFTArgs, SFTTask

    return _run(SFTTask(), SFTArgs(**_kwargs(args, ()), packing=args.packing), args)


def _dpo(args) -> int:
    from aigckit.tune.dpo import DPOArgs, DPOTask

    return _run(DPOTask(), DPOArgs(**_kwargs(args, ("beta", "loss_type", "label_smoothing"))), args)


def _rl(args) -> int:
    from aigckit.tune.grpo import RLArgs, RLTask

    kw = _kwargs(args, ("algo", "num_generations", "max_new_tokens", "temperature", "top_p", "beta", "epsilon",
                        "eval_generations"))
    if not args.reward:
        raise AigcError("give at least one --reward", param="reward")
    return _run(RLTask(), RLArgs(**kw, rewards=list(args.reward)), args)


def _merge(args) -> int:
    from aigckit.tune.export import merge_to_hf

    out = merge_to_hf(args.model, args.adapter, args.out)
    print(out)
    return 0
