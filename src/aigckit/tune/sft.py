"""Supervised fine-tuning (SFT) of a LoRA adapter: next-token cross-entropy on the assistant turns of chats (through
the model's chat template) or on whole texts, with packing and gradient accumulation (``trainer.py`` runs the loop).

The loss of one optimiser step is the mean over every labelled token of its ``grad_accum`` micro-batches (summed
per micro-batch, divided by the step's total), so accumulating k micro-batches equals one batch k times larger.
Held-out loss is the same mean over the held-out rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from aigckit.tune.data import (Example, pack, pad_batch, pad_id, sample_indices, sft_example, train_and_held,
                               truncate)
from aigckit.tune.trainer import TuneArgs, sum_nll


@dataclass
class SFTArgs(TuneArgs):
    packing: bool = False  # concatenate rows and cut into blocks of max_len tokens


def _examples(tok, rows, args: SFTArgs) -> list[Example]:
    exs = [sft_example(tok, r) for r in rows]
    if args.packing:
        return pack(exs, args.max_len)
    return [truncate(e, args.max_len) for e in exs]


class SFTTask:
    kind = "sft"

    def prepare(self, lm, args: SFTArgs) -> None:
        train, held = train_and_held(args, "sft")
        tok = lm.tokenizer
        self.pad = pad_id(tok)
        self.train = _examples(tok, train, args)
        self.held = _examples(tok, held, args) if held else []

    def _micro_batches(self, step: int, args: SFTArgs):
        idx = sample_indices(len(self.train), step, args.batch_size * args.grad_accum, args.seed)
        return [pad_batch([self.train[i] for i in idx[k:k + args.batch_size]], self.pad)
                for k in range(0, len(idx), args.batch_size)]

    def step(self, lm, model, step: int, args: SFTArgs) -> dict[str, float]:
        batches = self._micro_batches(step, args)
        n_target = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            loss = sum_nll(model, b.ids, b.labels) / max(n_target, 1)
            loss.backward()
            total += loss.item()
        return {"loss": total, "tokens": sum(b.tokens for b in batches), "loss_tokens": n_target}

    def evaluate(self, lm, model, args: SFTArgs) -> dict[str, float]:
        if not self.held:
            return {}
        total, count = 0.0, 0
        for k in range(0, len(self.held), args.batch_size):
            b = pad_batch(self.held[k:k + args.batch_size], self.pad)
            total += float(sum_nll(model, b.ids, b.labels))
            count += int((b.labels[:, 1:] != -100).sum())
        return {"eval_loss": total / max(count, 1)}
