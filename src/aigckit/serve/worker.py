"""The one adapter between the server and text generation.

``TextWorker`` is all the server knows about decoding: ``stream(prompt_ids, params)`` returns a handle (an iterator
of ``TokenEvent`` with ``.cancel()``; rows are ``num_return_sequences``), ``beam(prompt_ids, params)`` runs beam
search, ``QueueFull`` means "answer 429". Behind it sits ``aigckit.text.scheduler.Scheduler`` (continuous batching)
when that module exists, else ``SerialScheduler`` below: one worker thread and a bounded queue, so requests decode
one at a time. Swapping schedulers changes nothing outside this file.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from aigckit.text.engine import GenerationParams, GenerationResult, TokenEvent, generate, stream_tokens

log = logging.getLogger("aigckit.serve")


class QueueFull(Exception):
    """Too many requests waiting for this model: the server answers 429."""


_END = object()


class _Handle:
    """Events of one request, produced by a worker thread and consumed by the server."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, item: Any) -> None:
        self._q.put(item)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class SerialScheduler:
    """Stand-in for ``aigckit.text.scheduler.Scheduler`` with the same interface: one request decodes at a time."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 64) -> None:
        self.lm, self.max_queue = lm, max_queue
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._active = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"aigc-decode-{lm.name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def active(self) -> int:
        return self._active

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> _Handle:
        h = _Handle()
        with self._lock:
            if self._closed:
                raise QueueFull("server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests already waiting for {self.lm.name}")
            self._waiting += 1
        self._q.put((list(prompt_ids), params, h))
        return h

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            ids, params, h = job
            with self._lock:
                self._waiting -= 1
                self._active += 1
            try:
                if not h.cancelled:
                    for ev in stream_tokens(self.lm.model, self.lm.tokenizer, [ids], params):
                        h._put(ev)
                        if h.cancelled:
                            break
            except BaseException as e:  # delivered to the request that caused it
                h._put(e)
            finally:
                h._put(_END)
                with self._lock:
                    self._active -= 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._q.put(None)


def _make_scheduler(lm, max_batch: int, max_queue: int):
    try:
        from aigckit.text.scheduler import QueueFull as SchedulerQueueFull
        from aigckit.text.scheduler import Scheduler
    except ImportError:
        return SerialScheduler(lm, max_batch=max_batch, max_queue=max_queue), QueueFull
    return Scheduler(lm, max_batch=max_batch, max_queue=max_queue), SchedulerQueueFull


class _Rows:
    """n single-row handles read one after another as rows 0..n-1 (events buffer in each handle meanwhile)."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    def __iter__(self) -> Iterator[TokenEvent]:
        for row, h in enumerate(self.handles):
            for ev in h:
                yield replace(ev, row=row) if ev.row != row else ev


class TextWorker:
    """Decoding for one served LM. Thread-safe; shared by all requests for that model."""

    def __init__(self, lm, *, max_batch: int = 16, max_queue: int = 64) -> None:
        self.lm = lm
        self.max_queue = max_queue
        self.scheduler, self._queue_full = _make_scheduler(lm, max_batch, max_queue)
        self._beam_lock = threading.Lock()
        self._beam_waiting = 0
        self._beam_count_lock = threading.Lock()

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth + self._beam_waiting

    @property
    def active(self) -> int:
        return self.scheduler.active

    @property
    def context(self) -> int:
        """Prompt + generated tokens one request may use (the scheduler's cache may be shorter than the model's)."""
        return getattr(self.scheduler, "max_seq_len", self.lm.config.block_size)

    def stream(self, prompt_ids: list[int], params: GenerationParams) -> _Rows:
        """Start decoding; one scheduler request per returned sequence (seed, seed+1, ... when seeded)."""
        n = params.num_return_sequences
        handles = []
        try:
            for i in range(n):
                p = replace(params, num_return_sequences=1, seed=None if params.seed is None else params.seed + i)
                handles.append(self.scheduler.submit(list(prompt_ids), p))
        except self._queue_full as e:
            for h in handles:
                h.cancel()
            raise QueueFull(str(e) or "queue full") from None
        return _Rows(handles)

    @property
    def beams_in_scheduler(self) -> bool:
        return hasattr(self.scheduler, "generate_beam")

    def beam(self, prompt_ids: list[int], params: GenerationParams) -> GenerationResult:
        """Beam search (blocking). With the batching scheduler, the beams decode in the same batched steps as the
        sampled requests; otherwise one beam search at a time per model, with bounded waiting."""
        if self.beams_in_scheduler:
            try:
                seqs = self.scheduler.generate_beam(list(prompt_ids), params)
            except self._queue_full as e:
                raise QueueFull(str(e) or "queue full") from None
            return GenerationResult(self.lm.name, seqs, len(prompt_ids), {})
        with self._beam_count_lock:
            if self._beam_waiting >= self.max_queue:
                raise QueueFull(f"{self._beam_waiting} beam-search requests already waiting")
            self._beam_waiting += 1
        with self._beam_lock:
            with self._beam_count_lock:
                self._beam_waiting -= 1
            return generate(self.lm.model, self.lm.tokenizer, [list(prompt_ids)], params, self.lm.name)[0]

    def close(self) -> None:
        self.scheduler.close()
