"""Generation engine: parameters, prefill / decode loop over a batch of prompts, streaming, stop handling.

``stream_tokens`` is the one loop everything uses (``generate``, streaming, the server): it yields a ``TokenEvent``
per generated token per row, with the text delta that token completes (never half a UTF-8 character, never text
that might turn out to be the start of a stop string).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from aigckit.errors import AigcError, GenerationError
from aigckit.text import processors, sampling
from aigckit.text.kvcache import KVCache
from aigckit.text.params import MAX_NEW_TOKENS_DEFAULT, GenerationParams  # noqa: F401  (re-exported)
from aigckit.text.protocol import GenerationResult, Sequence, TokenEvent

__all__ = ["GenerationParams", "GenerationResult", "Sequence", "TokenEvent", "RowState", "stream_tokens", "generate",
           "run_beam_search", "sample_rows", "make_generator", "check_memory", "memory_limit"]


# --------------------------------------------------------------------------------------------------- memory


def memory_limit() -> tuple[float, str]:
    """Bytes one generation may plan to use, and where that number comes from: ``AIGC_MAX_MEMORY_GB`` if set, else
    80% of the memory available now (Linux ``MemAvailable``), else half the physical memory."""
    env = os.environ.get("AIGC_MAX_MEMORY_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise AigcError(f"AIGC_MAX_MEMORY_GB must be a number of GB, got {env!r}") from None
        return gb * 2**30, "AIGC_MAX_MEMORY_GB"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.8 * int(line.split()[1]) * 1024, "80% of available RAM; set AIGC_MAX_MEMORY_GB to change"
    except OSError:
        pass
    try:
        return 0.5 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), \
            "half the physical RAM; set AIGC_MAX_MEMORY_GB to change"
    except (ValueError, OSError, AttributeError):
        return float("inf"), "unknown"


def estimate_bytes(cfg, rows: int, seq_len: int, prompt_len: int, dtype: torch.dtype) -> int:
    """About how much memory decoding ``rows`` sequences of up to ``seq_len`` tokens needs: the KV cache, the
    prefill activations (``rows`` x ``prompt_len`` tokens at once) and a few float32 copies of the logits."""
    item = torch.empty((), dtype=dtype).element_size()
    kv = 2 * cfg.n_layer * rows * cfg.n_kv_head * seq_len * cfg.head_dim * item
    act = rows * prompt_len * (3 * cfg.intermediate_size + 4 * cfg.n_embd) * item
    logits = 4 * rows * cfg.vocab_size * 4
    return kv + act + logits


def check_memory(cfg, *, rows: int, seq_len: int, prompt_len: int, dtype: torch.dtype, param: str) -> None:
    """Refuse, before allocating, work whose estimate exceeds ``memory_limit()`` (error names ``param``)."""
    need = estimate_bytes(cfg, rows, seq_len, prompt_len, dtype)
    limit, source = memory_limit()
    if need > limit:
        raise AigcError(f"this needs about {need / 2**30:.2f} GiB ({rows} sequence(s) x {seq_len} tokens of KV cache "
                        f"and activations), more than the memory limit of {limit / 2**30:.2f} GiB ({source}): "
                        f"lower {param} or max_new_tokens", param=param)


# --------------------------------------------------------------------------------------------------- decoding


def make_generator(seed: int | None) -> torch.Generator:
    """A private RNG per request (concurrent requests never share sampling state)."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


class _StopMatcher:
    """Holds back text that could still become a stop string; cuts at the first stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
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


def prefill(model, cache: KVCache, prompts: list[list[int]], pad_id: int = 0,
            prefix: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Left-pad the prompts into one batch, run them through the model, return last-position logits [B, V],
    each row's start slot [B] and the padded length. ``prefix`` [B, P, dim]: input embeddings in place of the first
    P prompt tokens (then every prompt must have the same length: the prefix sits at slots 0..P-1)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    if prefix is not None and any(len(p) != L for p in prompts):
        raise AigcError("with a prefix of input embeddings all prompts must have the same length", param="prompt")
    dev = next(model.parameters()).device
    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    start = torch.empty(B, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        start[i] = L - len(p)
    start_arg = start if bool(start.any()) else None
    logits = model(tokens, torch.arange(L, device=dev), cache, start=start_arg, last_only=True, prefix=prefix)
    return logits[:, -1], start, L


def decode_step(model, cache: KVCache, tokens: Tensor, pos: int, start: Tensor | None) -> Tensor:
    """Feed one token per row at slot ``pos``; return next-token logits [B, V]."""
    dev = tokens.device
    return model(tokens[:, None], torch.tensor([pos], device=dev), cache, start=start)[:, -1]


class RowState:
    """Everything one generated sequence needs between steps: its tokens, text decoder, stop matcher and budget.
    Shared by the static batch loop below and by the continuous-batching scheduler.

    Per-request decoding state belongs here (never in the model or the scheduler): a new logits processor
    (a grammar mask, a watermark bias) keeps its state in a field set up in ``__init__`` from ``params`` and acts in
    ``process``; a new stop rule acts in ``push``. An exception raised by ``process`` or ``push`` ends this
    request alone (the scheduler reports it to its client and goes on with the batch)."""

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
        self.procs = processors.start_all(params.processors, self.seq, tokenizer, vocab_size)
        self.top: list[tuple[int, float]] | None = None  # set by sample_rows when params.top_logprobs > 0

    @property
    def needs_process(self) -> bool:
        return self.seen is not None or bool(self.params.no_repeat_ngram_size) or bool(self.procs)

    def process(self, scores: Tensor) -> Tensor:
        """Logits processors for this row (``scores`` [V] float32)."""
        p = self.params
        if self.seen is not None:
            scores = sampling.apply_repetition_penalty(scores, self.seen, p.repetition_penalty)
        if p.no_repeat_ngram_size:
            scores = sampling.apply_no_repeat_ngram(scores[None].clone(), [self.seq], p.no_repeat_ngram_size)[0]
        if self.procs:
            scores = processors.apply_all(self.procs, self.seq, scores.clone())
            if not bool(torch.isfinite(scores).any()):
                raise GenerationError("the logits processors allow no next token for this sequence "
                                      f"(after {self.n_gen} generated tokens)")
        return scores

    def push(self, tok: int, lp: float | None) -> TokenEvent:
        """Account for the sampled token; returns the event to emit (with finish_reason when the row ends)."""
        if self.procs:
            processors.advance_all(self.procs, tok)
        if tok in self.eos:
            self.active = False
            return TokenEvent(self.row, None, lp, self.stops.flush() + self.decoder.flush(), "stop",
                              top_logprobs=self.top, stop_token_id=tok)
        self.seq.append(tok)
        self.n_gen += 1
        if self.seen is not None:
            self.seen[tok] = True
        text, hit = self.stops.feed(self.decoder.push(tok))
        if hit:
            self.active = False
            return TokenEvent(self.row, tok, lp, text, "stop", top_logprobs=self.top)
        if self.n_gen >= self.budget:
            self.active = False
            tail, hit = self.stops.feed(self.decoder.flush())
            return TokenEvent(self.row, tok, lp, text + tail + ("" if hit else self.stops.flush()),
                              "stop" if hit else "length", top_logprobs=self.top)
        return TokenEvent(self.row, tok, lp, text, top_logprobs=self.top)

    def finish(self, reason: str) -> TokenEvent:
        self.active = False
        return TokenEvent(self.row, None, None, self.stops.flush() + self.decoder.flush(), reason)


def sample_rows(logits: Tensor, rows: list[RowState], params: GenerationParams,
                generator: torch.Generator | list[torch.Generator]) -> tuple[list[int], list[float | None]]:
    """Process and sample one token for each row of ``logits`` [len(rows), V] that share ``params`` (``generator``:
    one for all rows, or one per row: ``sampling.sample``)."""
    scores = logits.float()
    logp = torch.log_softmax(scores, dim=-1) if params.logprobs else None
    if any(r.needs_process for r in rows):
        scores = torch.stack([r.process(scores[i]) for i, r in enumerate(rows)])
    if params.greedy:
        nxt = scores.argmax(dim=-1).tolist()
    else:
        nxt = sampling.sample(scores, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                              min_p=params.min_p, generator=generator).tolist()
    lps = [float(logp[i, t]) if logp is not None else None for i, t in enumerate(nxt)]
    if params.top_logprobs:  # the model's most likely tokens (before processors), handed to each row's next event
        v, ix = torch.topk(logp, params.top_logprobs, dim=-1)
        for i, r in enumerate(rows):
            r.top = list(zip(ix[i].tolist(), v[i].tolist()))
    return nxt, lps


def stream_tokens(model, tokenizer, prompts: list[list[int]], params: GenerationParams,
                  stats: dict[str, float] | None = None,
                  generators: list[torch.Generator] | None = None,
                  prefix: Tensor | None = None) -> Iterator[TokenEvent]:
    """Sample (or greedily decode) continuations for a static batch of prompts; yields events as tokens arrive.
    ``generators``: one per prompt (each row's tokens then depend only on its own generator and logits, not on the
    batch around it; ``params.seed`` is unused); default one generator from ``params.seed`` for the batch.
    ``prefix`` [B, P, dim]: input embeddings for the prompts' first P positions (see ``prefill``)."""
    cfg = model.config
    B = len(prompts)
    if B == 0:
        raise AigcError("no prompts given", param="prompt")
    if any(len(p) == 0 for p in prompts):
        raise AigcError("empty prompt: give at least one token of text", param="prompt")
    budgets = [params.budget(len(p), cfg.block_size) for p in prompts]
    if generators is not None and len(generators) != B:
        raise AigcError(f"generators: one per row, {B} rows, got {len(generators)}", param="generators")
    gen = make_generator(params.seed) if generators is None else generators
    dtype = next(model.parameters()).dtype
    L = max(len(p) for p in prompts)
    check_memory(cfg, rows=B, seq_len=L + max(budgets), prompt_len=L, dtype=dtype,
                 param="num_return_sequences" if params.num_return_sequences > 1 else "prompt")
    cache = KVCache.for_model(cfg, B, L + max(budgets), dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [RowState(i, p, params, tokenizer, budgets[i], cfg.vocab_size) for i, p in enumerate(prompts)]

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, start, L = prefill(model, cache, prompts, pad, prefix)
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
                    stats: dict[str, float] | None = None, prefix: Tensor | None = None) -> list[Sequence]:
    from aigckit.text.beam import beam_search

    if params.stop:
        raise AigcError("stop strings are not supported with beam search; use max_new_tokens or EOS", param="stop")
    budget = params.budget(len(prompt), model.config.block_size)
    check_memory(model.config, rows=params.num_beams, seq_len=len(prompt) + budget, prompt_len=len(prompt),
                 dtype=next(model.parameters()).dtype, param="num_beams")
    eos = [] if params.ignore_eos else sorted(tokenizer.eos_token_ids)
    t0 = time.perf_counter()
    hyps = beam_search(model, prompt, num_beams=params.num_beams, max_new_tokens=budget, eos_ids=eos,
                       length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                       no_repeat_ngram_size=params.no_repeat_ngram_size,
                       repetition_penalty=params.repetition_penalty,
                       num_return_sequences=params.num_return_sequences,
                       processors=params.processors, tokenizer=tokenizer, prefix=prefix)
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
             generators: list[torch.Generator] | None = None,
             prefix: Tensor | None = None) -> list[GenerationResult]:
    """Generate for each prompt; ``num_return_sequences`` sequences per prompt. ``generators``: one per sequence
    (prompt-major: prompt j's sequence k draws from ``generators[j * n + k]``), see ``stream_tokens``. ``prefix``
    [len(prompts), P, dim]: input embeddings for each prompt's first P positions (see ``prefill``)."""
    results = []
    if prefix is not None and prefix.shape[0] != len(prompts):
        raise AigcError(f"prefix: one row per prompt, {len(prompts)} prompts, got {prefix.shape[0]}", param="prefix")
    if params.num_beams > 1:
        if generators is not None:
            raise AigcError("generators per row do not apply to beam search", param="num_beams")
        for j, p in enumerate(prompts):
            stats: dict[str, float] = {}
            seqs = run_beam_search(model, tokenizer, p, params, stats, None if prefix is None else prefix[j:j + 1])
            results.append(GenerationResult(model_name, seqs, len(p), _timings(stats, seqs)))
        return results
    n = params.num_return_sequences
    rows = [p for p in prompts for _ in range(n)]
    stats = {}
    texts = [[] for _ in rows]
    ids: list[list[int]] = [[] for _ in rows]
    lps: list[list[float]] = [[] for _ in rows]
    tops: list[list] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    row_prefix = None if prefix is None else prefix.repeat_interleave(n, 0)
    for ev in stream_tokens(model, tokenizer, rows, params, stats, generators, row_prefix):
        texts[ev.row].append(ev.text)
        if ev.token_id is not None:
            ids[ev.row].append(ev.token_id)
            if ev.logprob is not None:
                lps[ev.row].append(ev.logprob)
            if ev.top_logprobs is not None:
                tops[ev.row].append(ev.top_logprobs)
        if ev.finish_reason:
            reasons[ev.row] = ev.finish_reason
    for j, p in enumerate(prompts):
        seqs = []
        for r in range(j * n, (j + 1) * n):
            score = sum(lps[r]) / len(lps[r]) if lps[r] else None
            seqs.append(Sequence("".join(texts[r]), ids[r], reasons[r], score, lps[r] if params.logprobs else None,
                                 tops[r] if params.top_logprobs else None))
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
