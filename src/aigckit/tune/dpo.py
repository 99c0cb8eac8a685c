"""Direct Preference Optimisation (Rafailov et al. 2023) of a LoRA adapter.

Symbols (the paper's): x the prompt, y_w the chosen and y_l the rejected completion, pi_theta the policy (base +
adapter), pi_ref the reference (the same base with the adapter disabled: no second model copy), beta the KL strength.
log pi(y|x) is the sum of the completion tokens' log-probabilities. With
    h = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
the losses (TRL's ``loss_type`` names, same formulas):
    sigmoid   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (eps: label smoothing, cDPO)
    ipo       (h - 1 / (2 beta))^2   with log-probs averaged per token (Azar et al. 2023, as TRL)
    hinge     relu(1 - beta h)
Implicit rewards r = beta (log pi_theta - log pi_ref); reward accuracy = share of pairs with r_w > r_l.

Under ``torchrun`` each rank takes its slice of every step's global batch of pairs (``data.rank_rows``) and divides
its summed per-pair losses by its own number of pairs; every rank has as many, so the averaged gradients are the
gradient of the mean over the global batch (one process with the global batch), and the metrics averaged over the
ranks are the global batch's. The reference log-probs are each rank's own (adapter disabled on its copy of the base).
Held-out pairs: each rank scores every ranks-th batch, the sums are reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aigckit.errors import AigcError
from aigckit.train import distributed as dd
from aigckit.tune.data import IGNORE, Example, completion_ids, pad_batch, pad_id, rank_rows, train_and_held
from aigckit.tune.lora import adapters_disabled
from aigckit.tune.trainer import TuneArgs, token_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOArgs(TuneArgs):
    lr: float = 5e-5
    batch_size: int = 2
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def check(self) -> None:
        super().check()
        if not self.beta > 0:
            raise AigcError(f"beta must be > 0, got {self.beta}", param="beta")
        if self.loss_type not in LOSS_TYPES:
            raise AigcError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}",
                            param="loss_type")
        if not 0 <= self.label_smoothing < 0.5:
            raise AigcError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
                            param="label_smoothing")


def dpo_loss(pol_w: Tensor, pol_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and implicit rewards (chosen, rejected) from sequence log-probs [B]."""
    h = (pol_w - ref_w) - (pol_l - ref_l)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise AigcError(f"unknown loss_type {loss_type!r}", param="loss_type")
    return losses, beta * (pol_w - ref_w).detach(), beta * (pol_l - ref_l).detach()


@dataclass
class Pair:
    chosen: Example  # prompt + chosen, labels on the completion only
    rejected: Example


def _example(p: list[int], c: list[int], max_len: int, where: str) -> Example:
    ids = (p + c)[:max_len]
    labels = ([IGNORE] * len(p) + c)[:max_len]
    if all(x == IGNORE for x in labels[1:]):
        raise AigcError(f"{where}: the prompt fills max_len ({max_len} tokens): no completion token is left",
                        param="max_len")
    return Example(ids, labels, where)


def pair_examples(tok, rows, max_len: int) -> list[Pair]:
    out = []
    for r in rows:
        d = r.data
        pw, cw = completion_ids(tok, d["prompt"], d["chosen"], r.where)
        pl, cl = completion_ids(tok, d["prompt"], d["rejected"], r.where)
        out.append(Pair(_example(pw, cw, max_len, r.where), _example(pl, cl, max_len, r.where)))
    return out


def sequence_logps(model, pairs: list[Pair], pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Completion log-probs of [chosen; rejected] from one forward: (sum chosen, sum rejected, per-token mean chosen,
    per-token mean rejected), each [B]."""
    b = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad)
    lp = token_logps(model, b.ids, b.labels)
    s = lp.sum(-1)
    mean = s / (b.labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)
    n = len(pairs)
    return s[:n], s[n:], mean[:n], mean[n:]


class DPOTask:
    kind = "dpo"
    distributed = True  # data-parallel under torchrun (trainer.py)
    dist = dd.Dist()  # set by the loop

    def prepare(self, lm, args: DPOArgs) -> None:
        train, held = train_and_held(args, "dpo")
        tok = lm.tokenizer
        self.pad = pad_id(tok)
        self.train = pair_examples(tok, train, args.max_len)
        self.held = pair_examples(tok, held, args.max_len) if held else []

    def _losses(self, model, pairs: list[Pair], args: DPOArgs):
        """Per-pair losses, implicit rewards, and the policy's per-token mean log-probs (chosen, rejected)."""
        k = 2 if args.loss_type == "ipo" else 0  # IPO works on per-token means (as TRL)
        with torch.no_grad(), adapters_disabled(model):
            ref = sequence_logps(model, pairs, self.pad)
        pol = sequence_logps(model, pairs, self.pad)
        losses, rw, rl = dpo_loss(pol[k], pol[k + 1], ref[k], ref[k + 1], args.beta, args.loss_type,
                                  args.label_smoothing)
        return losses, rw, rl, pol[2].detach(), pol[3].detach()

    def step(self, lm, model, step: int, args: DPOArgs) -> dict[str, float]:
        d = self.dist
        idx = rank_rows(len(self.train), step, args.batch_size * args.grad_accum, args.seed, d.rank, d.world_size)
        n = len(idx)  # this rank's pairs; the same on every rank, so the averaged gradients are the global mean's
        sums = {"loss": 0.0, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "reward_accuracy": 0.0}
        tokens = 0
        for k in range(0, n, args.batch_size):
            pairs = [self.train[i] for i in idx[k:k + args.batch_size]]
            losses, rw, rl, _, _ = self._losses(model, pairs, args)
            (losses.sum() / n).backward()
            sums["loss"] += losses.sum().item() / n
            sums["rewards_chosen"] += rw.sum().item() / n
            sums["rewards_rejected"] += rl.sum().item() / n
            sums["reward_accuracy"] += (rw > rl).float().sum().item() / n
            tokens += sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
        sums["reward_margin"] = sums["rewards_chosen"] - sums["rewards_rejected"]
        return {**sums, "tokens": tokens}

    def evaluate(self, lm, model, args: DPOArgs) -> dict[str, float]:
        """Held-out DPO loss, reward accuracy (r_w > r_l; 0 before training, where r = 0) and preference accuracy
        of the policy itself (log pi(y_w|x) > log pi(y_l|x), per-token averaged so length does not decide)."""
        if not self.held:
            return {}
        s = {"loss": 0.0, "acc": 0.0, "pref": 0.0}
        d = self.dist  # under torchrun each rank takes every world_size-th batch; the sums are reduced
        for k in range(d.rank * args.batch_size, len(self.held), args.batch_size * d.world_size):
            pairs = self.held[k:k + args.batch_size]
            losses, rw, rl, aw, al = self._losses(model, pairs, args)
            s["loss"] += losses.sum().item()
            s["acc"] += (rw > rl).float().sum().item()
            s["pref"] += (aw > al).float().sum().item()
        s = dd.sum_over_ranks(s, d)
        n = len(self.held)
        return {"eval_loss": s["loss"] / n, "eval_reward_accuracy": s["acc"] / n,
                "eval_preference_accuracy": s["pref"] / n}
