"""Supervised fine-tuning (SFT) of a LoRA adapter: next-token cross-entropy on the assistant turns of chats (through
the model's chat template) or on whole texts, with packing and gradient accumulation (``trainer.py`` runs the loop).

The loss of one optimiser step is the mean over every labelled token of its ``grad_accum`` micro-batches (summed
per micro-batch, divided by the step's total), so accumulating k micro-batches equals one batch k times larger.
Held-out loss is the same mean over the held-out rows.

``--data`` may also be a token-shard folder (``aigc data tokenize --sft``; a path or an fsspec URL): rows are then
read from the memory map as the steps ask for them (``data.ShardRows``), never all at once, tokenised and masked
exactly as the JSONL they came from, so the run is the same run. With ``--packing`` the blocks are cut from the whole
corpus (``data.ShardBlocks``) and the held-out split (``--eval-frac``) is of blocks, not of rows.

Under ``torchrun`` each rank takes its slice of every step's global batch (``data.rank_rows``); the loss is divided
by the labelled tokens of the whole global batch (one ``all_reduce`` of a count), so averaging the ranks' gradients
gives exactly the gradient of one process with the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from aigckit.train import distributed as dd
from aigckit.tune.data import (Example, ShardBlocks, ShardRows, is_shard_folder, open_sft_shards, pack, pad_batch,
                               pad_id, rank_rows, sft_example, split_indices, train_and_held, truncate)
from aigckit.tune.trainer import TuneArgs, sum_nll


@dataclass
class SFTArgs(TuneArgs):
    packing: bool = False  # concatenate rows and cut into blocks of max_len tokens


def _examples(tok, rows, args: SFTArgs) -> list[Example]:
    exs = [sft_example(tok, r) for r in rows]
    if args.packing:
        return pack(exs, args.max_len)
    return [truncate(e, args.max_len) for e in exs]


def _shard_split(data: str, tok, args: SFTArgs, eval_frac: float):
    ts = open_sft_shards(data, tok)
    if args.packing:
        train, held = split_indices(ShardBlocks.count(ts, args.max_len), eval_frac, args.seed)
        return ShardBlocks(ts, train, args.max_len), ShardBlocks(ts, held, args.max_len)
    train, held = split_indices(ts.num_docs, eval_frac, args.seed)
    return ShardRows(ts, train, args.max_len), ShardRows(ts, held, args.max_len)


class SFTTask:
    kind = "sft"
    distributed = True  # data-parallel under torchrun (trainer.py)
    dist = dd.Dist()  # set by the loop

    def prepare(self, lm, args: SFTArgs) -> None:
        tok = lm.tokenizer
        self.pad = pad_id(tok)
        if is_shard_folder(args.data):
            self.train, self.held = _shard_split(args.data, tok, args, 0.0 if args.eval_data else args.eval_frac)
            if args.eval_data:
                self.held = (_shard_split(args.eval_data, tok, args, 0.0)[0] if is_shard_folder(args.eval_data)
                             else _examples(tok, train_and_held(args, "sft")[1], args))
            return
        train, held = train_and_held(args, "sft")
        self.train = _examples(tok, train, args)
        self.held = _examples(tok, held, args) if held else []

    def _micro_batches(self, step: int, args: SFTArgs):
        d = self.dist
        idx = rank_rows(len(self.train), step, args.batch_size * args.grad_accum, args.seed, d.rank, d.world_size)
        return [pad_batch([self.train[i] for i in idx[k:k + args.batch_size]], self.pad)
                for k in range(0, len(idx), args.batch_size)]

    def step(self, lm, model, step: int, args: SFTArgs) -> dict[str, float]:
        batches = self._micro_batches(step, args)
        mine = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
        # the global batch's labelled tokens; x world_size because the ranks' gradients are averaged, not summed
        n_target = round(dd.mean_over_ranks({"n": mine}, self.dist)["n"] * self.dist.world_size)
        denom = max(n_target, 1) / self.dist.world_size
        total = 0.0
        for b in batches:
            loss = sum_nll(model, b.ids, b.labels) / denom
            loss.backward()
            total += loss.item()
        return {"loss": total, "tokens": sum(b.tokens for b in batches), "loss_tokens": mine}

    def evaluate(self, lm, model, args: SFTArgs) -> dict[str, float]:
        if not self.held:
            return {}
        total, count = 0.0, 0
        d = self.dist  # under torchrun each rank takes every world_size-th batch; the sums are reduced
        for k in range(d.rank * args.batch_size, len(self.held), args.batch_size * d.world_size):
            b = pad_batch(self.held[k:k + args.batch_size], self.pad)
            total += float(sum_nll(model, b.ids, b.labels))
            count += int((b.labels[:, 1:] != -100).sum())
        sums = dd.mean_over_ranks({"nll": total, "count": count}, d)
        return {"eval_loss": sums["nll"] / sums["count"] if sums["count"] else 0.0}
