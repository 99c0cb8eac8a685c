"""Continuous batching: requests join and leave the running batch between decode steps.

One worker thread owns the model and a KV cache of ``max_batch`` slots. Each step it admits waiting requests into
free slots (prefilling them together, up to ``PREFILL_TOKENS`` prompt tokens per forward), then runs ONE batched
decode step for every active sequence, samples each request with its own parameters and private RNG, and hands
the tokens to the requests' queues. A beam-search request holds ``num_beams`` slots and advances its ``BeamState``
in that same step (its slots' caches are permuted after each step); it reports its sequences when it ends. Active
slots are kept compact (0..A-1): when a sequence in the middle ends, the last one moves into its slot, so the decode step reads a
contiguous cache prefix without gathering.

Isolation: an exception inside one request's sampling, logits processing or stop handling ends that request alone
(its handle raises a ``GenerationError`` naming what happened, or the ``AigcError`` itself); the batch goes on. Only a
failure of the shared forward pass fails every running request.

    sched = Scheduler(lm, max_batch=16)
    for ev in sched.submit(lm.encode("Hello"), GenerationParams(max_new_tokens=20)):
        print(ev.text, end="")
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from aigckit.errors import AigcError, GenerationError, QueueFull
from aigckit.text import omp
from aigckit.text.beam import BeamState
from aigckit.text.engine import RowState, check_memory, make_generator, sample_rows
from aigckit.text.kvcache import KVCache
from aigckit.text.params import GenerationParams
from aigckit.text.protocol import Sequence, TokenEvent

__all__ = ["Scheduler", "RequestHandle", "QueueFull", "PREFILL_TOKENS"]

log = logging.getLogger("aigckit.text")

PREFILL_TOKENS = 512  # prompt tokens prefilled together in one admission round (one forward)

_DONE = object()


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: GenerationParams
    budget: int
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    rows: list[RowState] = field(default_factory=list)  # per-sequence decoding state (sampled requests)
    beam: BeamState | None = None
    slots: list[int | None] = field(default_factory=list)  # current cache slot of each row (None once freed)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    adapter: int = -1  # index into lm.adapters (text/multilora.py); -1: the base model


class RequestHandle:
    """Iterate to receive ``TokenEvent``s (``row`` = index among the request's sequences); ``cancel()`` to stop."""

    def __init__(self, req: _Request) -> None:
        self._req = req

    def __iter__(self):
        while True:
            item = self._req.out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self._req.cancelled.set()

    @property
    def time_to_first_token(self) -> float | None:
        return self._req.first_token_s


class Scheduler:
    def __init__(self, lm, *, max_batch: int = 16, max_queue: int = 64, max_seq_len: int | None = None) -> None:
        if max_batch < 1:
            raise AigcError(f"max_batch must be >= 1, got {max_batch}", param="max_batch")
        if max_queue < 1:  # every request waits in the queue first: a queue of 0 could never run one
            raise AigcError(f"max_queue must be >= 1, got {max_queue}", param="max_queue")
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        cfg = self.model.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_seq_len = min(cfg.block_size, max_seq_len or 2048)
        dtype = next(self.model.parameters()).dtype
        check_memory(cfg, rows=max_batch, seq_len=self.max_seq_len, prompt_len=PREFILL_TOKENS, dtype=dtype,
                     param="max_batch")
        self.cache = KVCache.for_model(cfg, max_batch, self.max_seq_len, dtype)
        self.pos = [0] * max_batch  # next write position of each slot
        self.slot_row: list[tuple[_Request, int] | None] = [None] * max_batch
        self.waiting: deque[_Request] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.steps = 0
        self.tokens_generated = 0
        self._threads = torch.get_num_threads()  # OpenMP settings are per thread: carry them into the worker
        # the model was most likely loaded on this thread: its idle OpenMP workers would make libgomp throttle the
        # worker's spin-waits (see aigckit.text.omp); from here on only the scheduler thread computes
        omp.release_idle_workers()
        self.thread = threading.Thread(target=self._loop, name="aigc-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------ public
    @property
    def active(self) -> int:
        return sum(1 for s in self.slot_row if s is not None)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def submit(self, prompt: list[int], params: GenerationParams, adapter: str | None = None) -> RequestHandle:
        """Queue one request (``params`` was validated when it was made). Raises ``QueueFull`` when
        ``max_queue`` requests are already waiting. ``adapter``: the name of one of ``lm.adapters`` (loaded with
        ``load_lm(adapters=...)``) to decode this request with; None decodes with the base model."""
        index = self._adapter_index(adapter)
        if not isinstance(params, GenerationParams):
            raise AigcError(f"params must be a GenerationParams, got {type(params).__name__}", param="params")
        if not prompt:
            raise AigcError("empty prompt: give at least one token of text", param="prompt")
        if self._slots_needed(params) > self.max_batch:
            what = "num_beams" if params.num_beams > 1 else "num_return_sequences"
            raise AigcError(f"{what} must be <= {self.max_batch} on this server (--max-batch), got "
                            f"{self._slots_needed(params)}", param=what)
        if params.num_beams > 1 and params.stop:
            raise AigcError("stop strings are not supported with beam search; use max_new_tokens or EOS",
                            param="stop")
        budget = params.budget(len(prompt), self.max_seq_len)
        req = _Request(list(prompt), params, budget, generator=make_generator(params.seed), adapter=index)
        with self.lock:
            if self.closed:
                raise AigcError("the scheduler is closed")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests waiting (limit {self.max_queue})")
            self.waiting.append(req)
            self.lock.notify()
        return RequestHandle(req)

    def generate_beam(self, prompt: list[int], params: GenerationParams, adapter: str | None = None
                      ) -> list[Sequence]:
        """Beam search through the shared batched step; blocks until done, returns the sequences best first."""
        seqs: dict[int, Sequence] = {}
        ids: dict[int, list[int]] = {}
        for ev in self.submit(prompt, params, adapter):
            if ev.token_id is not None:
                ids.setdefault(ev.row, []).append(ev.token_id)
            if ev.finish_reason:
                seqs[ev.row] = Sequence(ev.text, ids.get(ev.row, []), ev.finish_reason, ev.score)
        return [seqs[i] for i in sorted(seqs)]

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join(timeout=30)

    def _adapter_index(self, adapter: str | None) -> int:
        if adapter is None:
            return -1
        adapters = getattr(self.lm, "adapters", None)
        if adapters is None:
            raise AigcError(f"adapter {adapter!r}: this model was loaded without adapters", param="model")
        return adapters.index(adapter)

    def _forward(self, adapters: list[int], *args, **kwargs) -> torch.Tensor:
        """The model's forward for a batch whose row i uses adapter ``adapters[i]``: the base model itself when no
        row uses one (its fused kernels), else the adapter tree with this batch's selection (a value)."""
        if all(k < 0 for k in adapters):
            return self.model(*args, **kwargs)
        from aigckit.text.multilora import select, using

        with using(select(adapters)):
            return self.lm.adapters.model(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ worker
    def _loop(self) -> None:
        from aigckit.text.kernels.gemm import set_num_threads

        set_num_threads(self._threads)  # torch's and numba's thread counts are per thread: set both here
        while True:
            with self.lock:
                while not self.closed and not self.waiting and self.active == 0:
                    self.lock.wait()
                if self.closed:
                    break
            try:
                self._admit()
                self._step()
            except Exception as e:  # the shared forward failed: no running request can go on
                log.exception("batched decode step failed")
                self._fail_all(e)
        self._fail_all(AigcError("the scheduler was closed"))

    def _free_slots(self) -> int:
        return self.max_batch - self.active

    @staticmethod
    def _slots_needed(params: GenerationParams) -> int:
        return params.num_beams if params.num_beams > 1 else params.num_return_sequences

    def _admit(self) -> None:
        """Take the waiting requests that fit into free slots, up to ``PREFILL_TOKENS`` prompt tokens (at least one
        request), and prefill them together: larger rounds would delay every request's first token behind the
        whole burst, smaller ones re-read all weights per request."""
        batch: list[_Request] = []
        free = self._free_slots()
        tokens = 0
        while True:
            with self.lock:
                if not self.waiting or self._slots_needed(self.waiting[0].params) > free:
                    break
                if batch and tokens + len(self.waiting[0].prompt) > PREFILL_TOKENS:
                    break
                req = self.waiting.popleft()
            tokens += len(req.prompt)
            if req.cancelled.is_set():
                req.out.put(_DONE)
                continue
            free -= self._slots_needed(req.params)
            batch.append(req)
        if batch:
            self._prefill(batch)

    def _prefill(self, reqs: list[_Request]) -> None:
        """One forward for all newly admitted prompts, right-padded to the longest: a real token only attends to
        earlier slots, so padding never reaches it, and each row's padding slots are overwritten by its own decode
        steps before they could be read (a row attends to slots 0..pos only). Logits are taken at each prompt's
        last token."""
        first = self.active
        slots_of, s0 = [], first
        for req in reqs:
            n = self._slots_needed(req.params)
            slots_of.append(list(range(s0, s0 + n)))
            s0 += n
        lens = [len(r.prompt) for r in reqs]
        T = max(lens)
        tokens = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, r in enumerate(reqs):
            tokens[i, :lens[i]] = torch.tensor(r.prompt)
        try:
            with torch.inference_mode():
                first_slots = torch.tensor([s[0] for s in slots_of])
                logits = self._forward([r.adapter for r in reqs], tokens, torch.arange(T), self.cache,
                                       rows=first_slots, logits_at=torch.tensor(lens) - 1)[:, 0]
                for slots, L in zip(slots_of, lens):
                    for s in slots[1:]:  # n > 1: every sequence starts from the same prompt cache
                        for k, v in zip(self.cache.k, self.cache.v):
                            k[s, :, :L] = k[slots[0], :, :L]
                            v[s, :, :L] = v[slots[0], :, :L]
        except Exception as e:  # these requests hold no slots yet; the running ones are untouched
            log.exception("prefill failed")
            for req in reqs:
                self._fail(req, e)
            return
        # every admitted request takes its slots before any of them may finish and free one (slots stay compact)
        for req, slots, L in zip(reqs, slots_of, lens):
            req.slots = list(slots)
            for i, s in enumerate(slots):
                self.slot_row[s] = (req, i)
                self.pos[s] = L
        for i, req in enumerate(reqs):
            self._guarded(req, self._start, req, logits[i:i + 1])

    def _start(self, req: _Request, logits: torch.Tensor) -> None:
        """Set up the request's decoding state and take its first token from the prefill ``logits`` [1, V]."""
        n = len(req.slots)
        p = req.params
        if p.num_beams > 1:
            eos = [] if p.ignore_eos else sorted(self.tokenizer.eos_token_ids)
            req.beam = BeamState(req.prompt, num_beams=n, max_new_tokens=req.budget, eos_ids=eos,
                                 length_penalty=p.length_penalty, early_stopping=p.early_stopping,
                                 no_repeat_ngram_size=p.no_repeat_ngram_size,
                                 repetition_penalty=p.repetition_penalty, num_return_sequences=p.num_return_sequences,
                                 processors=p.processors, tokenizer=self.tokenizer,
                                 vocab_size=self.model.config.vocab_size)
            self._beam_step(req, logits.expand(n, -1))
            return
        vocab = self.model.config.vocab_size
        req.rows = [RowState(i, req.prompt, p, self.tokenizer, req.budget, vocab) for i in range(n)]
        self._emit(req, logits.expand(n, -1))

    def _guarded(self, req: _Request, fn, *args) -> None:
        """Run one request's own work (sampling, processors, stop handling); if it raises, end that request alone."""
        try:
            fn(*args)
        except Exception as e:
            log.exception("request failed; the batch goes on")
            self._fail(req, e)

    def _step(self) -> None:
        A = self.active
        if A == 0:
            return
        toks, adapters = [], []
        for s in range(A):
            req, i = self.slot_row[s]
            toks.append(int(req.beam.next_tokens()[i]) if req.beam is not None else req.rows[i].seq[-1])
            adapters.append(req.adapter)
        tokens = torch.tensor(toks, dtype=torch.long).view(A, 1)
        pos = torch.tensor(self.pos[:A], dtype=torch.long).view(A, 1)
        with torch.inference_mode():
            logits = self._forward(adapters, tokens, pos, self.cache)[:, -1]
        self.steps += 1
        for s in range(A):
            self.pos[s] += 1
        # group slots by request before emitting: releasing finished rows moves slots around
        groups: dict[_Request, list[tuple[int, int]]] = {}
        for s in range(A):
            req, i = self.slot_row[s]
            groups.setdefault(req, []).append((i, s))
        for req, pairs in groups.items():
            pairs.sort()
            if req.beam is not None:
                self._guarded(req, self._beam_step, req, logits[[s for _, s in pairs]])
            else:
                self._guarded(req, self._emit, req, logits[[s for _, s in pairs]], [i for i, _ in pairs])

    def _emit(self, req: _Request, logits: torch.Tensor, only: list[int] | None = None) -> None:
        """Sample the next token for the request's active rows, publish events, release finished rows."""
        idx = only if only is not None else [i for i, r in enumerate(req.rows) if r.active]
        rows = [req.rows[i] for i in idx]
        if req.cancelled.is_set():
            for r in rows:
                req.out.put(r.finish("cancelled"))
                self._release(req, r.row)
            req.out.put(_DONE)
            return
        ids, lps = sample_rows(logits, rows, req.params, req.generator)
        if req.first_token_s is None:
            req.first_token_s = time.perf_counter() - req.submitted
        for r, tok, lp in zip(rows, ids, lps):
            ev = r.push(tok, lp)
            self.tokens_generated += ev.token_id is not None
            req.out.put(ev)
            if not r.active:
                self._release(req, r.row)
        if not any(r.active for r in req.rows):
            req.out.put(_DONE)

    def _beam_step(self, req: _Request, logits: torch.Tensor) -> None:
        """Advance a beam search by one token: permute its slots' caches, finish when the search is done."""
        if req.cancelled.is_set():
            for i in reversed(range(len(req.slots))):
                self._release(req, i)
            req.out.put(TokenEvent(0, None, None, "", "cancelled"))
            req.out.put(_DONE)
            return
        reorder, done = req.beam.step(logits)
        if req.first_token_s is None:
            req.first_token_s = time.perf_counter() - req.submitted
        slots = torch.tensor(req.slots)
        n = self.pos[req.slots[0]]
        if not done:
            if not torch.equal(reorder, torch.arange(len(req.slots))):
                src = slots[reorder]
                for k, v in zip(self.cache.k, self.cache.v):
                    k[slots, :, :n] = k[src, :, :n]
                    v[slots, :, :n] = v[src, :, :n]
            return
        for i in reversed(range(len(req.slots))):
            self._release(req, i)
        for i, h in enumerate(req.beam.results()):
            ids = h.token_ids[:-1] if h.ended_with_eos else h.token_ids
            for t in ids:
                req.out.put(TokenEvent(i, t, None, ""))
            self.tokens_generated += len(ids)
            req.out.put(TokenEvent(i, None, None, self.tokenizer.decode(ids),
                                   "stop" if h.ended_with_eos else "length", h.score))
        req.out.put(_DONE)

    def _release(self, req: _Request, row: int) -> None:
        """Free the slot of ``row``; move the last active slot into it to keep slots 0..A-1 compact."""
        s = req.slots[row]
        if s is None:
            return
        last = self.active - 1
        if s != last:
            other, orow = self.slot_row[last]
            n = self.pos[last]
            for k, v in zip(self.cache.k, self.cache.v):
                k[s, :, :n] = k[last, :, :n]
                v[s, :, :n] = v[last, :, :n]
            self.slot_row[s], self.pos[s] = (other, orow), n
            other.slots[orow] = s
        self.slot_row[last] = None
        self.pos[last] = 0
        req.slots[row] = None

    def _fail(self, req: _Request, err: Exception) -> None:
        """End one request with ``err``: free whatever slots it holds, tell its client."""
        for row in range(len(req.slots)):
            self._release(req, row)
        for r in req.rows:
            r.active = False
        req.out.put(_client_error(err))
        req.out.put(_DONE)

    def _fail_all(self, err: Exception) -> None:
        seen = set()
        for s in range(self.max_batch):
            if self.slot_row[s] is not None:
                req = self.slot_row[s][0]
                if req not in seen:
                    seen.add(req)
                    req.out.put(_client_error(err))
                    req.out.put(_DONE)
                self.slot_row[s] = None
                self.pos[s] = 0
        with self.lock:
            while self.waiting:
                req = self.waiting.popleft()
                req.out.put(_client_error(err))
                req.out.put(_DONE)


def _client_error(err: Exception) -> Exception:
    """What the request's client sees: our own errors as they are, anything else as a ``GenerationError``."""
    if isinstance(err, (AigcError, GenerationError)):
        return err
    return GenerationError(f"generation failed for this request: {type(err).__name__}: {err}")
