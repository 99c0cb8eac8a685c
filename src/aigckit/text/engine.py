"""Generation engine: parameters, prefill / decode loop over a batch of prompts, streaming, stop handling.

``stream_tokens`` is the one loop everything uses (``generate``, streaming, the server): it yields a ``TokenEvent``
per generated token per row, with the text delta that token completes (never half a UTF-8 character, never text
that might turn out to be the start of a stop string).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from aigckit.errors import AigcError
from aigckit.text import sampling
from aigckit.text.kvcache import KVCache

MAX_NEW_TOKENS_DEFAULT = 256


@dataclass
class GenerationParams:
    max_new_tokens: int | None = None  # default: MAX_NEW_TOKENS_DEFAULT, limited by max_length / the context
    max_length: int | None = None  # prompt + generated tokens
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    ignore_eos: bool = False

    @classmethod
    def from_kwargs(cls, **kw: Any) -> GenerationParams:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(kw) - known)
        if bad:
            raise AigcError(f"unknown generation parameter(s): {', '.join(bad)}")
        p = cls(**{k: v for k, v in kw.items() if v is not None or k in ("max_new_tokens", "max_length", "seed")})
        if isinstance(p.stop, str):
            p.stop = [p.stop]
        p.validate()
        return p

    def validate(self) -> None:
        sampling.validate(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                          repetition_penalty=self.repetition_penalty)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise AigcError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise AigcError(f"max_length must be >= 1, got {self.max_length}")
        if self.num_beams < 1:
            raise AigcError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_return_sequences < 1:
            raise AigcError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise AigcError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.no_repeat_ngram_size < 0:
            raise AigcError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.early_stopping not in (True, False, "never"):
            raise AigcError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise AigcError("stop strings must be non-empty strings")
        if len(self.stop) > 16:
            raise AigcError(f"at most 16 stop strings, got {len(self.stop)}")

    def budget(self, prompt_len: int, context: int) -> int:
        """How many tokens this prompt may generate; raises if the prompt leaves no room."""
        if prompt_len >= context:
            raise AigcError(f"prompt is {prompt_len} tokens, the context window is {context}: nothing left to generate")
        room = context - prompt_len
        if self.max_length is not None:
            if self.max_length <= prompt_len:
                raise AigcError(f"max_length {self.max_length} leaves no room after the {prompt_len}-token prompt")
            room = min(room, self.max_length - prompt_len)
        want = self.max_new_tokens if self.max_new_tokens is not None else MAX_NEW_TOKENS_DEFAULT
        return min(want, room)


@dataclass
class Sequence:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    score: float | None = None  # beam score, or mean log-probability for sampled sequences
    logprobs: list[float] | None = None


@dataclass
class GenerationResult:
    model: str
    sequences: list[Sequence]
    prompt_tokens: int
    timings: dict[str, float]

    @property
    def text(self) -> str:
        return self.sequences[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.sequences[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.sequences[0].finish_reason

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": sum(len(s.token_ids) for s in self.sequences)}


@dataclass
class TokenEvent:
    row: int
    token_id: int | None  # None for a final event that only flushes text
    logprob: float | None
    text: str  # text delta made visible by this event
    finish_reason: str | None = None
    score: float | None = None  # beam search: the finished sequence's score (on its final event)


def make_generator(seed: int | None) -> torch.Generator:
    """A private RNG per request (concurrent requests never share sampling state)."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


class _StopMatcher:
    """Holds back text that could still become a stop string; cuts at the first stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.buf = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        self.buf += delta
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [(self.buf.find(s), s) for s in self.stops if s in self.buf]
        if hits:
            idx = min(h[0] for h in hits)
            out, self.buf = self.buf[:idx], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def prefill(model, cache: KVCache, prompts: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor, int]:
    """Left-pad the prompts into one batch, run them through the model, return last-position logits [B, V],
    each row's start slot [B] and the padded length."""
    B, L = len(prompts), max(len(p) for p in prompts)
    dev = next(model.parameters()).device
    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    start = torch.empty(B, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        start[i] = L - len(p)
    start_arg = start if bool(start.any()) else None
    logits = model(tokens, torch.arange(L, device=dev), cache, start=start_arg, last_only=True)
    return logits[:, -1], start, L


def decode_step(model, cache: KVCache, tokens: Tensor, pos: int, start: Tensor | None) -> Tensor:
    """Feed one token per row at slot ``pos``; return next-token logits [B, V]."""
    dev = tokens.device
    return model(tokens[:, None], torch.tensor([pos], device=dev), cache, start=start)[:, -1]


class RowState:
    """Everything one generated sequence needs between steps: its tokens, text decoder, stop matcher and budget.
    Shared by the static batch loop below and by the continuous-batching scheduler."""

    def __init__(self, row: int, prompt: list[int], params: GenerationParams, tokenizer, budget: int,
                 vocab_size: int) -> None:
        self.row, self.params, self.budget = row, params, budget
        self.seq = list(prompt)
        self.n_gen = 0
        self.active = True
        self.eos = set() if params.ignore_eos else set(tokenizer.eos_token_ids)
        self.decoder = tokenizer.stream_decoder(prompt)
        self.stops = _StopMatcher(params.stop)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[prompt] = True

    def process(self, scores: Tensor) -> Tensor:
        """Logits processors for this row (``scores`` [V] float32)."""
        p = self.params
        if self.seen is not None:
            scores = sampling.apply_repetition_penalty(scores, self.seen, p.repetition_penalty)
        if p.no_repeat_ngram_size:
            scores = sampling.apply_no_repeat_ngram(scores[None].clone(), [self.seq], p.no_repeat_ngram_size)[0]
        return scores

    def push(self, tok: int, lp: float | None) -> TokenEvent:
        """Account for the sampled token; returns the event to emit (with finish_reason when the row ends)."""
        if tok in self.eos:
            self.active = False
            return TokenEvent(self.row, None, None, self.stops.flush() + self.decoder.flush(), "stop")
        self.seq.append(tok)
        self.n_gen += 1
        if self.seen is not None:
            self.seen[tok] = True
        text, hit = self.stops.feed(self.decoder.push(tok))
        if hit:
            self.active = False
            return TokenEvent(self.row, tok, lp, text, "stop")
        if self.n_gen >= self.budget:
            self.active = False
            tail, hit = self.stops.feed(self.decoder.flush())
            return TokenEvent(self.row, tok, lp, text + tail + ("" if hit else self.stops.flush()),
                              "stop" if hit else "length")
        return TokenEvent(self.row, tok, lp, text)

    def finish(self, reason: str) -> TokenEvent:
        self.active = False
        return TokenEvent(self.row, None, None, self.stops.flush() + self.decoder.flush(), reason)


def sample_rows(logits: Tensor, rows: list[RowState], params: GenerationParams, generator: torch.Generator
                ) -> tuple[list[int], list[float | None]]:
    """Process and sample one token for each row of ``logits`` [len(rows), V] that share ``params``."""
    scores = logits.float()
    logp = torch.log_softmax(scores, dim=-1) if params.logprobs else None
    if any(r.seen is not None or r.params.no_repeat_ngram_size for r in rows):
        scores = torch.stack([r.process(scores[i]) for i, r in enumerate(rows)])
    nxt = sampling.sample(scores, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                          min_p=params.min_p, generator=generator).tolist()
    lps = [float(logp[i, t]) if logp is not None else None for i, t in enumerate(nxt)]
    return nxt, lps


def stream_tokens(model, tokenizer, prompts: list[list[int]], params: GenerationParams,
                  stats: dict[str, float] | None = None) -> Iterator[TokenEvent]:
    """Sample (or greedily decode) continuations for a static batch of prompts; yields events as tokens arrive."""
    cfg = model.config
    B = len(prompts)
    if B == 0:
        raise AigcError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise AigcError("empty prompt: give at least one token of text")
    budgets = [params.budget(len(p), cfg.block_size) for p in prompts]
    gen = make_generator(params.seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache.for_model(cfg, B, max(len(p) for p in prompts) + max(budgets), dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [RowState(i, p, params, tokenizer, budgets[i], cfg.vocab_size) for i, p in enumerate(prompts)]

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, start, L = prefill(model, cache, prompts, pad)
        t1 = time.perf_counter()
        start_arg = start if bool(start.any()) else None
        steps = 0
        while True:
            ids, lps = sample_rows(logits, rows, params, gen)
            steps += 1
            for r in rows:
                if r.active:
                    yield r.push(ids[r.row], lps[r.row])
            if not any(r.active for r in rows):
                break
            logits = decode_step(model, cache, torch.tensor(ids), L + steps - 1, start_arg)
        t2 = time.perf_counter()
    if stats is not None:
        stats["prefill_s"] = t1 - t0
        stats["decode_s"] = t2 - t1
        stats["prefill_tokens"] = sum(len(p) for p in prompts)
        stats["decode_steps"] = steps


def run_beam_search(model, tokenizer, prompt: list[int], params: GenerationParams,
                    stats: dict[str, float] | None = None) -> list[Sequence]:
    from aigckit.text.beam import beam_search

    if params.stop:
        raise AigcError("stop strings are not supported with beam search; use max_new_tokens or EOS")
    budget = params.budget(len(prompt), model.config.block_size)
    eos = [] if params.ignore_eos else sorted(tokenizer.eos_token_ids)
    t0 = time.perf_counter()
    hyps = beam_search(model, prompt, num_beams=params.num_beams, max_new_tokens=budget, eos_ids=eos,
                       length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                       no_repeat_ngram_size=params.no_repeat_ngram_size,
                       repetition_penalty=params.repetition_penalty,
                       num_return_sequences=params.num_return_sequences)
    out = []
    for h in hyps:
        ids = h.token_ids[:-1] if h.ended_with_eos else h.token_ids
        out.append(Sequence(tokenizer.decode(ids), ids, "stop" if h.ended_with_eos else "length", h.score))
    if stats is not None:
        stats["prefill_s"] = 0.0
        stats["decode_s"] = time.perf_counter() - t0
        stats["prefill_tokens"] = len(prompt)
        stats["decode_steps"] = max((len(h.token_ids) for h in hyps), default=0)
    return out


def generate(model, tokenizer, prompts: list[list[int]], params: GenerationParams, model_name: str = "",
             ) -> list[GenerationResult]:
    """Generate for each prompt; ``num_return_sequences`` sequences per prompt."""
    results = []
    if params.num_beams > 1:
        for p in prompts:
            stats: dict[str, float] = {}
            seqs = run_beam_search(model, tokenizer, p, params, stats)
            results.append(GenerationResult(model_name, seqs, len(p), _timings(stats, seqs)))
        return results
    n = params.num_return_sequences
    rows = [p for p in prompts for _ in range(n)]
    stats = {}
    texts = [[] for _ in rows]
    ids: list[list[int]] = [[] for _ in rows]
    lps: list[list[float]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    for ev in stream_tokens(model, tokenizer, rows, params, stats):
        texts[ev.row].append(ev.text)
        if ev.token_id is not None:
            ids[ev.row].append(ev.token_id)
            if ev.logprob is not None:
                lps[ev.row].append(ev.logprob)
        if ev.finish_reason:
            reasons[ev.row] = ev.finish_reason
    for j, p in enumerate(prompts):
        seqs = []
        for r in range(j * n, (j + 1) * n):
            score = sum(lps[r]) / len(lps[r]) if lps[r] else None
            seqs.append(Sequence("".join(texts[r]), ids[r], reasons[r], score, lps[r] if params.logprobs else None))
        results.append(GenerationResult(model_name, seqs, len(p), _timings(stats, seqs)))
    return results


def _timings(stats: dict[str, float], seqs: list[Sequence]) -> dict[str, float]:
    pre = stats.get("prefill_s", 0.0)
    dec = stats.get("decode_s", 0.0)
    steps = stats.get("decode_steps", 0)
    return {
        "prefill_s": round(pre, 4),
        "decode_s": round(dec, 4),
        "prefill_tok_s": round(stats.get("prefill_tokens", 0) / pre, 2) if pre > 0 else None,
        "decode_tok_s": round(steps / dec, 2) if dec > 0 else None,
    }
