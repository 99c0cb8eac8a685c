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

from aigckit.errors import GenerationError
from aigckit.text import processors as procs
from aigckit.text.kvcache import KVCache
from aigckit.text.sampling import apply_no_repeat_ngram, apply_repetition_penalty

NEG = -1.0e9


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens, the final EOS included if it ended with one
    score: float  # length-penalised sum of log-probabilities
    ended_with_eos: bool


class BeamState:
    """One beam search in progress, advanced one step at a time by whoever runs the model (``beam_search`` below, or
    the continuous-batching scheduler, which decodes beams in the same batched step as sampled requests).

    ``step(logits)`` takes the next-token logits of the ``num_beams`` running rows ([nb, V]) and returns the row
    reorder (row i continues from row ``reorder[i]``; the caller permutes its KV cache rows accordingly) and whether
    the search is done. ``next_tokens()`` are the tokens to feed next, at position ``cur_len - 1``."""

    def __init__(self, prompt: list[int], *, num_beams: int, max_new_tokens: int, eos_ids: list[int],
                 length_penalty: float = 1.0, early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1, processors: tuple = (),
                 tokenizer=None, vocab_size: int = 0) -> None:
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not 1 <= num_return_sequences <= num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {early_stopping!r}")
        self.nb, self.eos_ids = num_beams, list(eos_ids)
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.no_repeat_ngram_size, self.repetition_penalty = no_repeat_ngram_size, repetition_penalty
        self.num_return_sequences = num_return_sequences
        self.prompt_len = len(prompt)
        self.max_length = self.prompt_len + max_new_tokens
        nb = num_beams
        self.eos = torch.tensor(self.eos_ids, dtype=torch.long)
        self.beams_to_keep = max(2, 1 + len(self.eos_ids)) * nb
        self.top_nb_mask = torch.arange(self.beams_to_keep) < nb
        self.running = torch.full((nb, self.max_length), -1, dtype=torch.long)
        self.running[:, :self.prompt_len] = torch.tensor(prompt)
        self.running_scores = torch.full((nb,), NEG)
        self.running_scores[0] = 0.0  # all beams start equal: only the first may expand at step one
        self.final = self.running.clone()
        self.final_scores = torch.full((nb,), NEG)
        self.final_len = torch.zeros(nb, dtype=torch.long)
        self.finished = torch.zeros(nb, dtype=torch.bool)
        self.improvable = True
        self.cur_len = self.prompt_len
        self.done = False
        self.procs: list[list] = []  # per running beam: its logits processors' states (aigckit.text.processors)
        if processors:
            first = procs.start_all(tuple(processors), list(prompt), tokenizer, vocab_size)
            self.procs = [first] + [procs.fork_all(first) for _ in range(nb - 1)]

    def next_tokens(self) -> torch.Tensor:
        return self.running[:, self.cur_len - 1]

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        nb, cur_len, prompt_len = self.nb, self.cur_len, self.prompt_len
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if self.repetition_penalty != 1.0:
            seen = torch.zeros_like(log_probs, dtype=torch.bool)
            seen.scatter_(1, self.running[:, :cur_len], True)
            log_probs = apply_repetition_penalty(log_probs, seen, self.repetition_penalty)
        if self.no_repeat_ngram_size > 0:
            log_probs = apply_no_repeat_ngram(log_probs.clone(), self.running[:, :cur_len].tolist(),
                                              self.no_repeat_ngram_size)
        if self.procs:
            log_probs = log_probs.clone()
            seqs = self.running[:, :cur_len].tolist()
            for i, states in enumerate(self.procs):
                log_probs[i] = procs.apply_all(states, seqs[i], log_probs[i])
            if not bool(torch.isfinite(log_probs[self.running_scores > NEG / 2]).any()):
                raise GenerationError("the logits processors allow no next token for any beam")
        V = log_probs.shape[-1]
        acc = (log_probs + self.running_scores[:, None]).reshape(-1)
        topk_lp, topk_idx = torch.topk(acc, self.beams_to_keep)
        src_beam, tok = topk_idx // V, topk_idx % V
        topk_seqs = self.running[src_beam]
        topk_seqs[:, cur_len] = tok
        hits = torch.isin(tok, self.eos) | (cur_len + 1 >= self.max_length)

        # the best num_beams continuations that did not finish keep running
        masked = topk_lp + hits.float() * NEG
        sel = torch.topk(masked, nb).indices
        self.running, self.running_scores, reorder = topk_seqs[sel], masked[sel], src_beam[sel]
        if self.procs:
            new_tok = tok[sel].tolist()
            self.procs = [procs.fork_all(self.procs[int(j)]) for j in reorder]
            for states, t in zip(self.procs, new_tok):
                procs.advance_all(states, t)

        # finished candidates (only among the top num_beams) compete for the finished slots
        just_done = hits & self.top_nb_mask
        cand = topk_lp / ((cur_len + 1 - prompt_len) ** self.length_penalty)
        if bool(self.finished.all()) and self.early_stopping is True:
            cand = cand + NEG
        if not self.improvable:
            cand = cand + NEG
        cand = cand + (~just_done).float() * NEG
        merged_scores = torch.cat((self.final_scores, cand))
        keep = torch.topk(merged_scores, nb).indices
        self.final = torch.cat((self.final, topk_seqs))[keep]
        self.final_scores = merged_scores[keep]
        self.final_len = torch.cat((self.final_len, torch.full_like(cand, cur_len + 1, dtype=torch.long)))[keep]
        self.finished = torch.cat((self.finished, just_done))[keep]
        self.cur_len = cur_len = cur_len + 1

        # can a running beam still beat the worst finished hypothesis?
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = self.running_scores[0] / (best_len ** self.length_penalty)
        worst_final = torch.where(self.finished, self.final_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_running > worst_final).any())
        exists_open = not (bool(self.finished.all()) and self.early_stopping is True)
        self.done = not (self.improvable and exists_open and not bool(hits.all()))
        return reorder, self.done

    def results(self) -> list[Hypothesis]:
        out = []
        for i in range(self.num_return_sequences):
            if self.final_scores[i] <= NEG / 2:  # fewer finished hypotheses than requested
                break
            ids = self.final[i, self.prompt_len:self.final_len[i]].tolist()
            out.append(Hypothesis(ids, float(self.final_scores[i]), bool(ids) and ids[-1] in self.eos_ids))
        return out


def beam_search(model, prompt: list[int], *, num_beams: int, max_new_tokens: int, eos_ids: list[int],
                length_penalty: float = 1.0, early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                repetition_penalty: float = 1.0, num_return_sequences: int = 1, processors: tuple = (),
                tokenizer=None, cache_dtype: torch.dtype | None = None,
                prefix: torch.Tensor | None = None) -> list[Hypothesis]:
    """Run a whole beam search on its own KV cache (one batched forward of all beams per step). ``prefix`` [1, P,
    dim]: input embeddings in place of the prompt's first P tokens."""
    state = BeamState(prompt, num_beams=num_beams, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                      num_return_sequences=num_return_sequences, processors=processors, tokenizer=tokenizer,
                      vocab_size=model.config.vocab_size)
    nb, L = num_beams, len(prompt)
    cache = KVCache.for_model(model.config, nb, state.max_length, cache_dtype or next(model.parameters()).dtype)
    with torch.inference_mode():
        # prefill once and share the prompt's cache with every beam
        logits = model(torch.tensor([prompt]), torch.arange(L), cache, last_only=True, prefix=prefix)[:, -1]
        for k, v in zip(cache.k, cache.v):
            k[1:, :, :L] = k[:1, :, :L]
            v[1:, :, :L] = v[:1, :, :L]
        logits = logits.expand(nb, -1)
        while True:
            reorder, done = state.step(logits)
            if done:
                break
            cache.reorder(reorder, state.cur_len - 1)  # slots 0..cur_len-2 are filled
            pos = state.cur_len - 1
            logits = model(state.next_tokens()[:, None], torch.tensor([pos]), cache)[:, -1]
    return state.results()
