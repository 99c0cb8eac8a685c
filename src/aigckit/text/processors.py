"""Logits processors: per-request rules on the next-token scores (grammar masks, watermark biases, ...).

A processor is a *value* that goes into ``GenerationParams.processors``: immutable, safe to share between requests
and threads. It holds no decoding state itself. For each generated sequence the engine calls ``start`` once and
gets a ``ProcessorState`` that lives with that sequence (in ``engine.RowState`` for sampled rows, in
``beam.BeamState`` for beams) and is driven like this, every decode step, by every decoding mode (greedy, sampling,
beam search, the continuous-batching scheduler's rows)::

    state = processor.start(prompt, tokenizer, vocab_size)
    loop:
        scores = state.process(seq, scores)     # seq = prompt + tokens chosen so far; scores [V] float32
        tok = <sample / argmax / beam top-k over the processed scores>
        state.advance(tok)                      # every chosen token, EOS included
    # beam search: a beam that continues from beam j gets states[j].fork() before its advance

Order in a step (see ``engine.RowState.process`` and ``beam.BeamState.step``): repetition penalty and n-gram bans,
then the processors in the order given, then temperature / top-k / top-p / min-p and the draw. Log-probabilities
reported to the user (``logprobs``) are the model's, before any processor.

Rules:
- ``process`` returns scores of the same shape; it may change them in place. Masking a token = ``-inf``.
- A processor that allows no token at all makes the request fail with a ``GenerationError`` (alone: the batch goes
  on), never a NaN draw.
- To let a sequence end only where a rule allows, mask the EOS ids (``tokenizer.eos_token_ids``) elsewhere; to end
  it, allow only EOS. A sequence cut by its token budget reports ``finish_reason == "length"``.
- Anything ``process``/``advance`` raises ends that request alone (the scheduler's isolation rule).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["LogitsProcessor", "ProcessorState", "start_all", "apply_all", "advance_all", "fork_all"]


@runtime_checkable
class ProcessorState(Protocol):
    """The per-sequence state of one processor."""

    def process(self, seq: list[int], scores: Tensor) -> Tensor:
        """Adjust next-token ``scores`` [V] (float32) for a sequence whose tokens so far are ``seq``."""
        ...

    def advance(self, token: int) -> None:
        """Account for the token chosen for this sequence."""
        ...

    def fork(self) -> ProcessorState:
        """An independent copy (a beam that continues from this one)."""
        ...


@runtime_checkable
class LogitsProcessor(Protocol):
    """An immutable rule; ``start`` makes the state for one sequence."""

    def start(self, prompt: list[int], tokenizer, vocab_size: int) -> ProcessorState:
        ...


def start_all(processors: tuple[LogitsProcessor, ...], prompt: list[int], tokenizer, vocab_size: int
              ) -> list[ProcessorState]:
    return [p.start(prompt, tokenizer, vocab_size) for p in processors]


def apply_all(states: list[ProcessorState], seq: list[int], scores: Tensor) -> Tensor:
    for s in states:
        scores = s.process(seq, scores)
    return scores


def advance_all(states: list[ProcessorState], token: int) -> None:
    for s in states:
        s.advance(token)


def fork_all(states: list[ProcessorState]) -> list[ProcessorState]:
    return [s.fork() for s in states]
