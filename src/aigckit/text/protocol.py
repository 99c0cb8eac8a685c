"""``TextModel``: what every text model offers (the local ``LM`` and the remote ``RemoteLM``), and the values it
returns. No torch here, so remote models and front ends use it without loading one.

    def summarise(lm: TextModel, text: str) -> str:
        return lm.chat([{"role": "user", "content": "Summarise: " + text}], temperature=0).text

Every generation method takes ``params: GenerationParams | None`` and keyword overrides of its fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sequence:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    score: float | None = None  # beam score, or mean log-probability for sampled sequences
    logprobs: list[float] | None = None
    # with top_logprobs = k: per generated token, the k most likely (token id, logprob) pairs, best first
    top_logprobs: list[list[tuple[int, float]]] | None = None


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
    top_logprobs: list[tuple[int, float]] | None = None  # params.top_logprobs > 0: the k most likely (id, logprob)
    stop_token_id: int | None = None  # the EOS token that ended the row (token_id is None then; logprob is its)


@dataclass
class ScoreResult:
    nll: float  # mean negative log-likelihood per predicted token (natural log)
    ppl: float  # exp(nll)
    n_tokens: int  # number of predicted tokens
    window: int = 0  # tokens per forward window
    stride: int = 0  # tokens the window advances by (= window: non-overlapping windows)
    windows: int = 0  # forward windows used

    def to_dict(self) -> dict[str, Any]:
        return {"nll": self.nll, "ppl": self.ppl, "n_tokens": self.n_tokens,
                "windowing": {"window": self.window, "stride": self.stride, "windows": self.windows}}


@runtime_checkable
class TextModel(Protocol):
    """A text model: local (``aigckit.text.lm.LM``) or behind an OpenAI-compatible API (``RemoteLM``)."""

    name: str

    @property
    def run_config(self) -> dict[str, Any]: ...

    def generate(self, prompt: str | list[int], params: GenerationParams | None = None,
                 **overrides: Any) -> GenerationResult: ...

    def generate_batch(self, prompts: list[str | list[int]], params: GenerationParams | None = None,
                       **overrides: Any) -> list[GenerationResult]: ...

    def stream(self, prompt: str | list[int], params: GenerationParams | None = None,
               **overrides: Any) -> Iterator[str]: ...

    def stream_events(self, prompt: str | list[int], params: GenerationParams | None = None, *,
                      stats: dict | None = None, **overrides: Any) -> Iterator[TokenEvent]: ...

    def chat(self, messages: list[dict[str, str]], params: GenerationParams | None = None,
             **overrides: Any) -> GenerationResult: ...

    def chat_stream(self, messages: list[dict[str, str]], params: GenerationParams | None = None,
                    **overrides: Any) -> Iterator[str]: ...

    def score(self, text: str | list[int], *, window: int | None = None, stride: int | None = None
              ) -> ScoreResult: ...


def check_messages(messages: Any) -> None:
    """Chat messages are a non-empty list of ``{"role": one of ROLES, "content": str}``."""
    if not isinstance(messages, list) or not messages:
        raise AigcError("messages must be a non-empty list of {role, content}", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise AigcError(f"messages[{i}]: each message needs a role ({', '.join(ROLES)}) and string content",
                            param="messages")


def single_stream(p: GenerationParams) -> None:
    """``stream`` / ``chat_stream`` yield the text of one sequence."""
    if p.num_beams > 1:
        raise AigcError("streaming is not available with beam search", param="num_beams")
    if p.num_return_sequences > 1:
        raise AigcError("stream() and chat_stream() give one sequence; use stream_events for several",
                        param="num_return_sequences")
