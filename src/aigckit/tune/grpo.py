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
place, ``lora.refresh_merged``) and sampled by the engine (``LM.generate_batch`` with
``num_return_sequences = G``: the fused decode kernels, all prompts of the step in one batch). Its time is logged
(``merge_s``, ``gen_s``, ``gen_share``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams
from aigckit.tune.data import IGNORE, Example, pad_batch, pad_id, prompt_ids, sample_indices, train_and_held
from aigckit.tune.lora import adapters_disabled, merged_model, refresh_merged
from aigckit.tune.rewards import Reward, parse_reward, score
from aigckit.tune.trainer import TuneArgs, token_logps

ALGOS = ("grpo", "rloo")


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


@dataclass
class Prompt:
    ids: list[int]
    prompt: object  # the row's prompt (str or messages) for the reward functions
    columns: dict


class RLTask:
    kind = "rl"

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
    def _sample(self, lm, model, prompts: list[Prompt], n: int, params: GenerationParams):
        """n completions per prompt from the current policy: (completion ids with EOS where it stopped, texts)."""
        from aigckit.text.lm import LM

        t0 = time.perf_counter()
        gen = self.__dict__.get("_gen")
        if gen is None:  # built once; later steps rewrite only the adapted weights in place
            gen = self._gen = LM(merged_model(model), lm.tokenizer, lm.name)
        else:
            refresh_merged(gen.model, model)
        t1 = time.perf_counter()
        results = gen.generate_batch([p.ids for p in prompts], params, num_return_sequences=n)
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
        G = args.num_generations
        prompts = [self.train[i] for i in sample_indices(len(self.train), step, args.batch_size * args.grad_accum,
                                                         args.seed)]
        t0 = time.perf_counter()
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=(args.seed * 1_000_003 + step) % (1 << 62))
        model.eval()
        ids, texts, merge_s, gen_s = self._sample(lm, model, prompts, G, params)
        model.train()
        per, total = self._score(prompts, G, ids, texts)
        t_score = time.perf_counter()
        r = torch.tensor(total, dtype=torch.float64).view(len(prompts), G)
        adv = advantages(r, args.algo).float().view(-1)
        zero_std = float((r.std(-1) == 0).float().mean())

        n_tok = sum(len(c) for c in ids)
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
            loss = terms.sum() / max(n_tok, 1)
            loss.backward()
            loss_sum += loss.item()
            kl_sum += float(kl.sum())
            tokens += b.tokens
        t_end = time.perf_counter()
        out = {"reward": float(r.mean()), "reward_std": float(r.std(-1).mean()), "zero_std_frac": zero_std,
               "loss": loss_sum, "kl": kl_sum / max(n_tok, 1), "completion_len": n_tok / len(ids),
               "stopped_frac": sum(1 for c in ids if c and c[-1] == self.eos) / len(ids),
               "merge_s": round(merge_s, 4), "gen_s": round(gen_s, 3), "train_s": round(t_end - t_score, 3),
               "gen_share": round((merge_s + gen_s) / max(t_end - t0, 1e-9), 3), "tokens": tokens}
        for rw, vals in zip(self.rewards, per):
            finite = [v for v in vals if not math.isnan(v)]
            if finite:
                m = sum(finite) / len(finite)
                out[f"reward/{rw.name}"] = m
                out[f"reward_std/{rw.name}"] = math.sqrt(sum((v - m) ** 2 for v in finite) / len(finite))
        return out

    def evaluate(self, lm, model, args: RLArgs) -> dict[str, float]:
        """Held-out reward: a greedy completion per prompt (and ``eval_generations - 1`` sampled ones)."""
        if not self.held:
            return {}
        per_all: list[list[float]] = [[] for _ in self.rewards]
        totals: list[float] = []
        greedy = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0)
        runs = [(greedy, 1)]
        if args.eval_generations > 1:
            runs.append((GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, seed=args.seed + 17), args.eval_generations - 1))
        for params, n in runs:
            for k in range(0, len(self.held), 32):
                chunk = self.held[k:k + 32]
                ids, texts, _, _ = self._sample(lm, model, chunk, n, params)
                per, total = self._score(chunk, n, ids, texts)
                totals += total
                for acc, vals in zip(per_all, per):
                    acc += vals
        out = {"eval_reward": sum(totals) / len(totals)}
        for rw, vals in zip(self.rewards, per_all):
            finite = [v for v in vals if not math.isnan(v)]
            if finite:
                out[f"eval_reward/{rw.name}"] = sum(finite) / len(finite)
        return out

    def samples(self, lm, model, args: RLArgs, n: int = 4) -> list[dict]:
        """Greedy completions of the first ``n`` held-out prompts (for before/after reports)."""
        chunk = self.held[:n]
        if not chunk:
            return []
        ids, texts, _, _ = self._sample(lm, model, chunk, 1, GenerationParams(max_new_tokens=args.max_new_tokens,
                                                                               temperature=0))
        return [{"prompt": p.prompt, "completion": t} for p, t in zip(chunk, texts)]
