"""Reinforcement learning of a LoRA adapter against reward functions: GRPO (Shao et al. 2024, DeepSeekMath) and RLOO
(Ahmadian et al. 2024), one optimiser step per batch of generations.

Symbols: q a prompt, o_1..o_G its G sampled completions (a group), r_i their rewards (``rewards.py``, weighted sum),
pi_theta the policy (base + adapter), pi_old the policy that sampled (here the same weights: one update per batch, so
the ratio is 1 in value but carries the gradient), pi_ref the base with the adapter disabled, eps the clip range,
beta the KL weight.
  advantage  GRPO  A_i = (r_i - mean(r)) / (std(r) + 1e-4)            (group-normalised)
             RLOO  A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean(r))   (leave-one-out baseline)
  per token  rho_t = pi_theta(o_t | q, o_<t) / pi_old(...)
             L_t = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta KL_t
             KL_t = exp(ref_t - pol_t) - (ref_t - pol_t) - 1   (the k3 estimator, >= 0; as TRL)
  loss       mean of L_t over every completion token of the step (token-level, as TRL's "dapo"/"bnpo")
A group whose rewards are all equal has zero advantages (no signal): counted as ``zero_std_frac``.

Generation: the current adapter is merged into a model copy (``lora.merged_model``: the adapted linears get their
own tensors, every other weight is shared with the base; built once, and each step rewrites the adapted weights in
place, ``lora.refresh_merged``) and sampled by the engine (``engine.generate`` with ``num_return_sequences = G``:
the fused decode kernels, all prompts of the step (of this rank) in one batch). Its time is logged
(``merge_s``, ``gen_s``, ``gen_share``). Each completion draws from its own generator, seeded by (run seed, the
prompt's data position, completion number) (``row_seed``; the data position of the i-th prompt of step k is
k x global batch + i): its tokens depend on its prompt and the policy, not on the batch it was decoded in.

Under ``torchrun`` each rank takes its slice of the step's prompts (``data.rank_rows``; a group never spans ranks,
so the group-normalised and leave-one-out advantages are the same), samples its groups with its own engine copy
(rebuilt from the adapter before every sampling; the adapter is the same on every rank after each averaged step, and
the loop checks that at every checkpoint) and divides its loss by the completion tokens of the whole step (one
``all_reduce``), so the averaged gradients are one process's with the global batch. Reward mean and std, zero-std
groups, KL, loss and per-reward statistics are the global batch's (sums reduced over ranks); held-out prompts are
split over the ranks and the sums reduced. What does not depend on the number of ranks: the prompts of each step,
the seed of every completion, the advantages and the normalisation. What does, in the last bits only: a batch of
other shape rounds the logits (and the summed gradient) differently, so 2 ranks x B prompts and 1 x 2B draw the
same tokens except where a draw falls within that rounding of a boundary of the sampling distribution (not seen
in the tests), and losses and adapters agree to float tolerance, not bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams
from aigckit.train import distributed as dd
from aigckit.tune.data import IGNORE, Example, pad_batch, pad_id, prompt_ids, rank_rows, train_and_held
from aigckit.tune.lora import adapters_disabled, merged_model, refresh_merged
from aigckit.tune.rewards import Reward, parse_reward, score
from aigckit.tune.trainer import TuneArgs, token_logps

ALGOS = ("grpo", "rloo")
EVAL_CHUNK = 32  # held-out prompts sampled at once


@dataclass
class RLArgs(TuneArgs):
    lr: float = 1e-5
    batch_size: int = 4  # prompts per micro-batch (each with num_generations completions)
    algo: str = "grpo"
    rewards: list[str] = field(default_factory=list)  # SPECs (rewards.py)
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    eval_generations: int = 1  # held-out: the first greedy, the rest sampled at ``temperature``

    def check(self) -> None:
        super().check()
        if self.algo not in ALGOS:
            raise AigcError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}", param="algo")
        if not self.rewards:
            raise AigcError("give at least one reward", param="reward")
        if not 2 <= self.num_generations <= 256:
            raise AigcError(f"num_generations must be in 2..256 (a group needs 2), got {self.num_generations}",
                            param="num_generations")
        if self.beta < 0 or not 0 < self.epsilon < 1:
            raise AigcError(f"beta must be >= 0 and epsilon in (0, 1), got {self.beta}, {self.epsilon}",
                            param="beta" if self.beta < 0 else "epsilon")
        if self.eval_generations < 1:
            raise AigcError("eval_generations must be >= 1", param="eval_generations")
        GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)


def advantages(rewards: Tensor, algo: str) -> Tensor:
    """rewards [P, G] -> advantages [P, G]."""
    mean = rewards.mean(-1, keepdim=True)
    if algo == "grpo":
        return (rewards - mean) / (rewards.std(-1, keepdim=True) + 1e-4)
    G = rewards.shape[-1]
    return (rewards - mean) * G / (G - 1)


def policy_loss(pol: Tensor, old: Tensor, ref: Tensor | None, adv: Tensor, mask: Tensor, beta: float,
                epsilon: float) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate + KL (both [N, T], 0 off the mask): (loss terms, KL terms)."""
    ratio = torch.exp(pol - old)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = torch.zeros_like(pol)
    if ref is not None:
        d = ref - pol
        kl = torch.exp(d) - d - 1
    return (-surrogate + beta * kl) * mask, kl.detach() * mask


_M64 = (1 << 64) - 1


def row_seed(seed: int, position: int, j: int) -> int:
    """The sampling seed of completion ``j`` of the prompt at data position ``position`` in a run seeded ``seed``
    (splitmix64 of the three: neighbouring positions give unrelated streams); below 2**62."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + j * 0xC2B2AE3D27D4EB4F) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) >> 2


def _generators(seed: int, first: int, prompts: int, n: int) -> list[torch.Generator]:
    """One generator per completion of ``prompts`` prompts at data positions ``first``, ``first + 1``, ... (n each)."""
    return [torch.Generator().manual_seed(row_seed(seed, first + i, j)) for i in range(prompts) for j in range(n)]


def _reward_stats(rewards: list[Reward], per: list[list[float]], d: dd.Dist, prefix: str = "") -> dict[str, float]:
    """Mean (and, without ``prefix``, population std) of each reward's non-None values over every rank's rows."""
    sums: dict[str, float] = {}
    for rw, vals in zip(rewards, per):
        finite = [v for v in vals if not math.isnan(v)]
        sums[f"n/{rw.name}"], sums[f"s/{rw.name}"] = len(finite), sum(finite)
    sums = dd.sum_over_ranks(sums, d)
    means = {rw.name: sums[f"s/{rw.name}"] / sums[f"n/{rw.name}"] for rw in rewards if sums[f"n/{rw.name}"]}
    out = {f"{prefix}reward/{k}": m for k, m in means.items()}
    if prefix:
        return out
    sq = dd.sum_over_ranks({rw.name: sum((v - means[rw.name]) ** 2 for v in vals if not math.isnan(v))
                            for rw, vals in zip(rewards, per) if rw.name in means}, d)
    out.update({f"reward_std/{k}": math.sqrt(v / sums[f"n/{k}"]) for k, v in sq.items()})
    return out


@dataclass
class Prompt:
    ids: list[int]
    prompt: object  # the row's prompt (str or messages) for the reward functions
    columns: dict


class RLTask:
    kind = "rl"
    distributed = True  # data-parallel under torchrun (trainer.py)
    dist = dd.Dist()  # set by the loop

    def prepare(self, lm, args: RLArgs) -> None:
        self.kind = args.algo
        self.rewards: list[Reward] = [parse_reward(s) for s in args.rewards]
        train, held = train_and_held(args, "rl")
        tok = lm.tokenizer
        self.pad = pad_id(tok)
        self.eos = tok.eos_token_id
        self.train = [self._prompt(tok, r, args) for r in train]
        self.held = [self._prompt(tok, r, args) for r in held]

    @staticmethod
    def _prompt(tok, row, args: RLArgs) -> Prompt:
        ids = prompt_ids(tok, row.data["prompt"])
        if len(ids) + args.max_new_tokens > args.max_len:
            raise AigcError(f"{row.where}: prompt ({len(ids)} tokens) + max_new_tokens ({args.max_new_tokens}) "
                            f"exceed max_len ({args.max_len})", param="max_len")
        return Prompt(ids, row.data["prompt"], {k: v for k, v in row.data.items() if k != "prompt"})

    # -------------------------------------------------------------------------------- sampling and scoring
    def _sample(self, lm, model, prompts: list[Prompt], n: int, params: GenerationParams,
                generators: list[torch.Generator] | None = None):
        """n completions per prompt from the current policy: (completion ids with EOS where it stopped, texts);
        ``generators``: one per completion (prompt-major), else ``params.seed`` for the batch."""
        from aigckit.text.engine import generate
        from aigckit.text.lm import LM

        t0 = time.perf_counter()
        gen = self.__dict__.get("_gen")
        if gen is None:  # built once; later steps rewrite only the adapted weights in place
            gen = self._gen = LM(merged_model(model), lm.tokenizer, lm.name)
        else:
            refresh_merged(gen.model, model)
        t1 = time.perf_counter()
        results = generate(gen.model, gen.tokenizer, [p.ids for p in prompts],
                           GenerationParams.make(params, num_return_sequences=n), gen.name, generators)
        t2 = time.perf_counter()
        ids, texts = [], []
        for res in results:
            for s in res.sequences:
                tail = [self.eos] if s.finish_reason == "stop" and self.eos is not None else []
                ids.append(list(s.token_ids) + tail)
                texts.append(s.text)
        return ids, texts, t1 - t0, t2 - t1

    def _score(self, prompts: list[Prompt], n: int, ids: list[list[int]], texts: list[str]):
        rep = [p for p in prompts for _ in range(n)]
        chat = not isinstance(rep[0].prompt, str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        keys = sorted({k for p in rep for k in p.columns})
        columns = {k: [p.columns.get(k) for p in rep] for k in keys}
        return score(self.rewards, [p.prompt for p in rep], completions, columns, ids)

    def step(self, lm, model, step: int, args: RLArgs) -> dict[str, float]:
        G, d = args.num_generations, self.dist
        per_rank = args.batch_size * args.grad_accum
        prompts = [self.train[i] for i in rank_rows(len(self.train), step, per_rank, args.seed, d.rank,
                                                    d.world_size)]
        first = (step * d.world_size + d.rank) * per_rank  # the data position of this rank's first prompt
        t0 = time.perf_counter()
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p)
        model.eval()
        ids, texts, merge_s, gen_s = self._sample(lm, model, prompts, G, params,
                                                  _generators(args.seed, first, len(prompts), G))
        model.train()
        per, total = self._score(prompts, G, ids, texts)
        t_score = time.perf_counter()
        r = torch.tensor(total, dtype=torch.float64).view(len(prompts), G)
        adv = advantages(r, args.algo).float().view(-1)
        zero_std = float((r.std(-1) == 0).float().mean())

        n_tok = sum(len(c) for c in ids)
        # the step's completion tokens over all ranks, / world_size because the ranks' gradients are averaged
        denom = max(dd.sum_over_ranks({"n": n_tok}, d)["n"], 1) / d.world_size
        rows = args.batch_size * G
        kl_sum = 0.0
        loss_sum = 0.0
        tokens = 0
        for k in range(0, len(ids), rows):
            exs = []
            for j in range(k, min(k + rows, len(ids))):
                p = prompts[j // G].ids
                exs.append(Example(p + ids[j], [IGNORE] * len(p) + ids[j]))
            b = pad_batch(exs, self.pad)
            mask = (b.labels[:, 1:] != IGNORE).float()
            ref = None
            if args.beta > 0:
                with torch.no_grad(), adapters_disabled(model):
                    ref = token_logps(model, b.ids, b.labels)
            pol = token_logps(model, b.ids, b.labels)
            terms, kl = policy_loss(pol, pol.detach(), ref, adv[k:k + len(exs)], mask, args.beta, args.epsilon)
            loss = terms.sum() / denom
            loss.backward()
            loss_sum += loss.item()
            kl_sum += float(kl.sum())
            tokens += b.tokens
        t_end = time.perf_counter()
        out = {"reward": float(r.mean()), "reward_std": float(r.std(-1).mean()), "zero_std_frac": zero_std,
               "loss": loss_sum, "kl": kl_sum / denom, "completion_len": n_tok / len(ids),
               "stopped_frac": sum(1 for c in ids if c and c[-1] == self.eos) / len(ids),
               "merge_s": round(merge_s, 4), "gen_s": round(gen_s, 3), "train_s": round(t_end - t_score, 3),
               "gen_share": round((merge_s + gen_s) / max(t_end - t0, 1e-9), 3), "tokens": tokens}
        # the same on every rank (reduced here), so the loop's mean over ranks leaves them as they are
        return {**out, **_reward_stats(self.rewards, per, d)}

    def evaluate(self, lm, model, args: RLArgs) -> dict[str, float]:
        """Held-out reward: a greedy completion per prompt (and ``eval_generations - 1`` sampled ones, seeded per
        held-out prompt). Under torchrun each rank takes its contiguous share of the prompts; the sums are reduced."""
        if not self.held:
            return {}
        d = self.dist
        per_all: list[list[float]] = [[] for _ in self.rewards]
        totals: list[float] = []
        greedy = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0)
        runs = [(greedy, 1)]
        if args.eval_generations > 1:
            runs.append((GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p), args.eval_generations - 1))
        mine = range(d.rank * len(self.held) // d.world_size, (d.rank + 1) * len(self.held) // d.world_size)
        for params, n in runs:
            for k in range(mine.start, mine.stop, EVAL_CHUNK):
                chunk = self.held[k:min(k + EVAL_CHUNK, mine.stop)]
                gens = None if params.greedy else _generators(args.seed + 17, k, len(chunk), n)
                ids, texts, _, _ = self._sample(lm, model, chunk, n, params, gens)
                per, total = self._score(chunk, n, ids, texts)
                totals += total
                for acc, vals in zip(per_all, per):
                    acc += vals
        s = dd.sum_over_ranks({"sum": sum(totals), "n": len(totals)}, d)
        return {"eval_reward": s["sum"] / s["n"], **_reward_stats(self.rewards, per_all, d, "eval_")}

    def samples(self, lm, model, args: RLArgs, n: int = 4) -> list[dict]:
        """Greedy completions of the first ``n`` held-out prompts (for before/after reports; rank 0's alone)."""
        chunk = self.held[:n]
        if not chunk or not self.dist.is_main:
            return []
        ids, texts, _, _ = self._sample(lm, model, chunk, 1, GenerationParams(max_new_tokens=args.max_new_tokens,
                                                                               temperature=0))
        return [{"prompt": p.prompt, "completion": t} for p, t in zip(chunk, texts)]
