"""Beam search, run as one batched forward per step over all beams.

Follows the vectorised algorithm of transformers' generate (so outputs are token-identical for the same
arguments): each step keeps the top ``max(2, 1 + n_eos) * num_beams`` continuations of all beams; those that end in
EOS (or reach ``max_length``) compete for the ``num_beams`` finished slots with score ``sum_logprobs / len**length_penalty``;
the best unfinished ones continue. ``early_stopping``: True stops when ``num_beams`` hypotheses are finished; False
stops when the best running beam can no longer beat the worst finished one at the current length; "never" uses the
most optimistic length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aigckit.text.kvcache import KVCache
from aigckit.text.sampling import apply_no_repeat_ngram, apply_repetition_penalty

NEG = -1.0e9


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens, the final EOS included if it ended with one
    score: float  # length-penalised sum of log-probabilities
    ended_with_eos: bool


def beam_search(model, prompt: list[int], *, num_beams: int, max_new_tokens: int, eos_ids: list[int],
                length_penalty: float = 1.0, early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                repetition_penalty: float = 1.0, num_return_sequences: int = 1,
                cache_dtype: torch.dtype | None = None, on_step=None) -> list[Hypothesis]:
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be true, false or 'never', got {early_stopping!r}")
    cfg = model.config
    prompt_len = len(prompt)
    max_length = prompt_len + max_new_tokens
    nb, dev = num_beams, next(model.parameters()).device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    beams_to_keep = max(2, 1 + len(eos_ids)) * nb
    top_nb_mask = torch.arange(beams_to_keep, device=dev) < nb

    cache = KVCache.for_model(cfg, nb, max_length, cache_dtype or next(model.parameters()).dtype)
    running = torch.full((nb, max_length), -1, dtype=torch.long, device=dev)
    running[:, :prompt_len] = torch.tensor(prompt, device=dev)
    running_scores = torch.full((nb,), NEG, device=dev)
    running_scores[0] = 0.0
    final = running.clone()
    final_scores = torch.full((nb,), NEG, device=dev)
    final_len = torch.zeros(nb, dtype=torch.long, device=dev)
    finished = torch.zeros(nb, dtype=torch.bool, device=dev)
    improvable = True

    with torch.inference_mode():
        # prefill once and share the prompt's cache with every beam
        logits = model(running[:1, :prompt_len], torch.arange(prompt_len, device=dev), cache, last_only=True)[:, -1]
        for k, v in zip(cache.k, cache.v):
            k[1:, :, :prompt_len] = k[:1, :, :prompt_len]
            v[1:, :, :prompt_len] = v[:1, :, :prompt_len]
        logits = logits.expand(nb, -1)
        cur_len = prompt_len
        while True:
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            if repetition_penalty != 1.0:
                seen = torch.zeros_like(log_probs, dtype=torch.bool)
                seen.scatter_(1, running[:, :cur_len], True)
                log_probs = apply_repetition_penalty(log_probs, seen, repetition_penalty)
            if no_repeat_ngram_size > 0:
                log_probs = apply_no_repeat_ngram(log_probs.clone(), running[:, :cur_len].tolist(), no_repeat_ngram_size)
            V = log_probs.shape[-1]
            acc = (log_probs + running_scores[:, None]).reshape(-1)
            topk_lp, topk_idx = torch.topk(acc, beams_to_keep)
            src_beam, tok = topk_idx // V, topk_idx % V
            topk_seqs = running[src_beam]
            topk_seqs[:, cur_len] = tok
            hits = torch.isin(tok, eos) | (cur_len + 1 >= max_length)

            # the best num_beams continuations that did not finish keep running
            sel = torch.topk(topk_lp + hits.float() * NEG, nb).indices
            running, running_scores, reorder = topk_seqs[sel], (topk_lp + hits.float() * NEG)[sel], src_beam[sel]

            # finished candidates (only among the top num_beams) compete for the finished slots
            just_done = hits & top_nb_mask
            cand = topk_lp / ((cur_len + 1 - prompt_len) ** length_penalty)
            if bool(finished.all()) and early_stopping is True:
                cand = cand + NEG
            if not improvable:
                cand = cand + NEG
            cand = cand + (~just_done).float() * NEG
            merged_scores = torch.cat((final_scores, cand))
            keep = torch.topk(merged_scores, nb).indices
            final = torch.cat((final, topk_seqs))[keep]
            final_scores = merged_scores[keep]
            final_len = torch.cat((final_len, torch.full_like(cand, cur_len + 1, dtype=torch.long)))[keep]
            finished = torch.cat((finished, just_done))[keep]

            cache.reorder(reorder)
            cur_len += 1
            if on_step is not None:
                on_step(cur_len - prompt_len)
            # can a running beam still beat the worst finished hypothesis?
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = max_length - prompt_len
            else:
                best_len = cur_len - prompt_len
            best_running = running_scores[0] / (best_len ** length_penalty)
            worst_final = torch.where(finished, final_scores.min(), torch.tensor(NEG, device=dev))
            improvable = improvable and bool((best_running > worst_final).any())
            exists_open = not (bool(finished.all()) and early_stopping is True)
            if not (improvable and exists_open and not bool(hits.all())):
                break
            logits = model(running[:, cur_len - 1:cur_len], torch.tensor([cur_len - 1], device=dev), cache)[:, -1]

    out = []
    for i in range(num_return_sequences):
        if final_scores[i] <= NEG / 2:  # fewer finished hypotheses than requested (cannot happen at max_length)
            break
        ids = final[i, prompt_len:final_len[i]].tolist()
        out.append(Hypothesis(ids, float(final_scores[i]), bool(ids) and ids[-1] in eos_ids))
    return out
