"""The one adapter between the server and text generation.

``TextWorker`` is all the server knows about decoding: ``stream(prompt_ids, params)`` returns a handle (an iterator
of ``TokenEvent`` with ``.cancel()``; rows are ``num_return_sequences``), ``beam(prompt_ids, params)`` runs beam
search; both raise ``QueueFull`` (answer 429) when the queue is full right now. Behind it sits the
continuous-batching ``aigckit.text.scheduler.Scheduler``: sampled and beam requests decode together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from aigckit.errors import AigcError, QueueFull
from aigckit.text.params import LIMITS, GenerationParams
from aigckit.text.protocol import GenerationResult, TokenEvent
from aigckit.text.scheduler import Scheduler

__all__ = ["TextWorker", "QueueFull"]


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
    """Decoding for one served LM. Thread-safe; shared by all requests for that model.

    ``for_adapter(name, lm)`` is the worker of one of the base's side-by-side adapters (``--adapter``): it submits
    to the base's scheduler with the adapter's name, so base and adapter requests decode in the same batches."""

    def __init__(self, lm, *, max_batch: int = 16, max_queue: int = 64, scheduler: Scheduler | None = None,
                 adapter: str | None = None) -> None:
        self.lm = lm
        self.max_queue = max_queue
        self.adapter = adapter
        self.owns_scheduler = scheduler is None
        self.scheduler = scheduler or Scheduler(lm, max_batch=max_batch, max_queue=max_queue)

    def for_adapter(self, name: str, lm) -> TextWorker:
        """The worker for adapter ``name`` of this worker's model (``lm``: its ``LM.with_adapter(name)``)."""
        return TextWorker(lm, max_queue=self.max_queue, scheduler=self.scheduler, adapter=name)

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def active(self) -> int:
        return self.scheduler.active

    @property
    def context(self) -> int:
        """Prompt + generated tokens one request may use (the scheduler's cache may be shorter than the model's)."""
        return self.scheduler.max_seq_len

    def queue_places(self, params: GenerationParams, prompts: int = 1) -> int:
        """Scheduler requests ``prompts`` prompts with ``params`` take: one per sampled sequence, one per beam
        search. Raises ``AigcError`` (400, not 429) when that is more than the queue could ever hold."""
        need = prompts * (1 if params.num_beams > 1 else params.num_return_sequences)
        if need > self.max_queue:
            n = params.num_return_sequences
            how = f"{prompts} prompt(s) x n={n}" if params.num_beams == 1 else f"{prompts} prompt(s)"
            raise AigcError(f"this request needs {need} queue places ({how}) but this server queues at most "
                            f"{self.max_queue} requests per model (--max-queue): send fewer prompts or a smaller n",
                            param="n" if params.num_beams == 1 and n > 1 else "prompt")
        return need

    def stream(self, prompt_ids: list[int], params: GenerationParams) -> _Rows:
        """Start decoding; one scheduler request per returned sequence (seed, seed+1, ... when seeded)."""
        n = params.num_return_sequences
        self.queue_places(params)
        handles = []
        try:
            for i in range(n):
                seed = None if params.seed is None else (params.seed + i) % (LIMITS.seed + 1)
                p = params if n == 1 else replace(params, num_return_sequences=1, seed=seed)
                handles.append(self.scheduler.submit(list(prompt_ids), p, self.adapter))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return _Rows(handles)

    def beam(self, prompt_ids: list[int], params: GenerationParams) -> GenerationResult:
        """Beam search (blocking); the beams decode in the same batched steps as the sampled requests."""
        seqs = self.scheduler.generate_beam(list(prompt_ids), params, self.adapter)
        return GenerationResult(self.lm.name, seqs, len(prompt_ids), {})

    def close(self) -> None:
        if self.owns_scheduler:
            self.scheduler.close()
