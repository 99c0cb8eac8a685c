"""``RemoteLM``: a model behind an OpenAI-compatible API (OpenAI itself, or another ``aigc serve``), with the same
generate / stream / chat interface as the local ``LM``. Uses the official ``openai`` SDK.

    lm = load_lm("openai:tiny-chat", base_url="http://127.0.0.1:8000/v1", api_key="...")
    lm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=20).text

``RemoteLM`` is a ``TextModel`` (see ``aigckit.text.protocol``) like the local ``LM``; it imports neither ``lm`` nor
torch. Parameters are validated by ``GenerationParams`` first (same errors and defaults as local models). OpenAI's own names go as
they are; aigckit's extras (top_k, min_p, repetition_penalty, num_beams, ...) are sent in the body only when they
differ from the defaults, so a plain OpenAI endpoint never sees them unless asked. Remote models return no token
ids (``Sequence.token_ids`` is empty; ``usage`` comes from the API) and cannot ``score``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aigckit.errors import AigcError
from aigckit.text.params import MAX_NEW_TOKENS_DEFAULT, GenerationParams, with_constraint
from aigckit.text.protocol import (GenerationResult, ScoreResult, Sequence, TokenEvent, check_messages,
                                   single_stream)

_DEFAULTS = GenerationParams()
_EXTRAS = ("top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty",
           "early_stopping", "ignore_eos")


@dataclass
class RemoteResult(GenerationResult):
    completion_tokens: int = 0

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class RemoteLM:
    """A remote model with the local ``LM``'s generation interface."""

    def __init__(self, name: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2) -> None:
        import openai

        if not name:
            raise AigcError("openai:NAME needs a model name, e.g. openai:gpt-4o-mini")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("AIGC_API_KEY")
        if not key:
            if base_url is None:
                raise AigcError("no API key for openai:* models: set OPENAI_API_KEY (or AIGC_API_KEY), "
                                "or give --base-url for a server without a key")
            key = "no-key"  # an open local server; the SDK insists on some key
        self.name = name
        self.base_url = base_url or "https://api.openai.com/v1"
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self.tokenizer = None
        self.config = None
        self.dtype, self.quantize, self.load_s, self.source = "remote", None, 0.0, self.base_url

    def __repr__(self) -> str:
        return f"RemoteLM({self.name!r}, base_url={self.base_url!r})"

    @property
    def run_config(self) -> dict[str, Any]:
        return {"model": f"openai:{self.name}", "source": self.base_url, "dtype": "remote", "quantize": None}

    # ------------------------------------------------------------------------------------------ request building
    def _request(self, p: GenerationParams, *, chat: bool) -> dict[str, Any]:
        """The API call's arguments for ``p`` (already validated)."""
        if p.max_length is not None:
            raise AigcError("max_length is not available for remote models; use max_new_tokens", param="max_length")
        rf = None
        if len(p.processors) == 1 and callable(getattr(p.processors[0], "response_format", None)):
            rf = p.processors[0].response_format()  # a JSON-Schema constraint: the server's response_format
        elif p.processors:
            raise AigcError("logits processors run inside the local engine; a remote model cannot apply them",
                            param="processors")
        kw: dict[str, Any] = {"model": self.name, "temperature": p.temperature}
        max_new = p.max_new_tokens if p.max_new_tokens is not None else MAX_NEW_TOKENS_DEFAULT
        kw["max_completion_tokens" if chat else "max_tokens"] = max_new
        if p.top_p != 1.0:
            kw["top_p"] = p.top_p
        if p.stop:
            kw["stop"] = list(p.stop)
        if p.seed is not None:
            kw["seed"] = p.seed
        if p.num_return_sequences != 1:
            kw["n"] = p.num_return_sequences
        if p.logprobs:
            kw["logprobs"] = True if chat else 0
        extra = {k: getattr(p, k) for k in _EXTRAS if getattr(p, k) != getattr(_DEFAULTS, k)}
        if rf is not None:
            if chat:
                kw["response_format"] = rf
            else:  # not in OpenAI's completions API; aigc serve (and vLLM) take it there too
                extra["response_format"] = rf
        if extra:
            kw["extra_body"] = extra
        return kw

    def _call(self, fn, **kw):
        import openai

        try:
            return fn(**kw)
        except openai.APIStatusError as e:
            raise AigcError(f"remote model {self.name}: HTTP {e.status_code}: {_message(e)}") from None
        except openai.APIConnectionError as e:
            raise AigcError(f"cannot reach {self.base_url}: {e}") from None
        except openai.APIError as e:  # e.g. an error chunk inside a stream
            raise AigcError(f"remote model {self.name}: {_message(e)}") from None

    def _iterate(self, stream) -> Iterator[Any]:
        import openai

        try:
            yield from stream
        except openai.APIError as e:
            raise AigcError(f"remote model {self.name}: {_message(e)}") from None

    @staticmethod
    def _prompt(prompt: str | list[int]) -> str | list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise AigcError("empty prompt: give at least one token of text", param="prompt")
            return prompt
        ids = list(prompt)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise AigcError("a token-id prompt must be a non-empty list of non-negative ints", param="prompt")
        return ids

    # ------------------------------------------------------------------------------------------ completions
    def generate(self, prompt: str | list[int], params: GenerationParams | None = None,
                 **overrides: Any) -> GenerationResult:
        p = with_constraint(params, overrides)
        kw = self._request(p, chat=False)
        t0 = time.perf_counter()
        r = self._call(self.client.completions.create, prompt=self._prompt(prompt), **kw)
        seqs = []
        for c in sorted(r.choices, key=lambda c: c.index):
            lps = list(c.logprobs.token_logprobs) if (p.logprobs and c.logprobs) else None
            seqs.append(Sequence(c.text, [], c.finish_reason or "stop", None, lps))
        return _result(self.name, seqs, r.usage, time.perf_counter() - t0)

    def generate_batch(self, prompts: list[str | list[int]], params: GenerationParams | None = None,
                       **overrides: Any) -> list[GenerationResult]:
        p = with_constraint(params, overrides)
        return [self.generate(x, p) for x in prompts]

    def stream_events(self, prompt: str | list[int], params: GenerationParams | None = None, *,
                      stats: dict | None = None, **overrides: Any) -> Iterator[TokenEvent]:
        """TokenEvents as text arrives (``token_id`` is None: the API sends text, not ids)."""
        p = with_constraint(params, overrides)
        if p.num_beams > 1:
            raise AigcError("streaming is not available with beam search", param="num_beams")
        return self._events(prompt, p, stats)

    def _events(self, prompt: str | list[int], p: GenerationParams, stats: dict | None) -> Iterator[TokenEvent]:
        kw = self._request(p, chat=False)
        t0 = time.perf_counter()
        stream = self._call(self.client.completions.create, prompt=self._prompt(prompt), stream=True, **kw)
        for chunk in self._iterate(stream):
            for c in chunk.choices:
                lp = None
                if p.logprobs and c.logprobs and c.logprobs.token_logprobs:
                    lp = c.logprobs.token_logprobs[0]
                yield TokenEvent(c.index, None, lp, c.text or "", c.finish_reason)
        if stats is not None:
            stats["total_s"] = time.perf_counter() - t0

    def stream(self, prompt: str | list[int], params: GenerationParams | None = None,
               **overrides: Any) -> Iterator[str]:
        p = with_constraint(params, overrides)
        single_stream(p)
        return (ev.text for ev in self._events(prompt, p, None) if ev.text)

    # ------------------------------------------------------------------------------------------ chat
    def chat(self, messages: list[dict[str, str]], params: GenerationParams | None = None,
             **overrides: Any) -> GenerationResult:
        check_messages(messages)
        p = with_constraint(params, overrides)
        kw = self._request(p, chat=True)
        t0 = time.perf_counter()
        r = self._call(self.client.chat.completions.create, messages=messages, **kw)
        seqs = []
        for c in sorted(r.choices, key=lambda c: c.index):
            lps = [x.logprob for x in c.logprobs.content] if (p.logprobs and c.logprobs and c.logprobs.content) \
                else None
            seqs.append(Sequence(c.message.content or "", [], c.finish_reason or "stop", None, lps))
        return _result(self.name, seqs, r.usage, time.perf_counter() - t0)

    def chat_stream(self, messages: list[dict[str, str]], params: GenerationParams | None = None,
                    **overrides: Any) -> Iterator[str]:
        check_messages(messages)
        p = with_constraint(params, overrides)
        single_stream(p)
        return self._chat_deltas(messages, self._request(p, chat=True))

    def _chat_deltas(self, messages: list[dict[str, str]], kw: dict[str, Any]) -> Iterator[str]:
        stream = self._call(self.client.chat.completions.create, messages=messages, stream=True, **kw)
        for chunk in self._iterate(stream):
            for c in chunk.choices:
                if c.delta and c.delta.content:
                    yield c.delta.content

    # ------------------------------------------------------------------------------------------ not remote
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        raise AigcError("chat_prompt is not available for remote models (the server applies its chat template)")

    def encode(self, text: str) -> list[int]:
        raise AigcError("tokenisation is not available for remote models")

    def score(self, text: str | list[int], *, window: int | None = None, stride: int | None = None) -> ScoreResult:
        raise AigcError("score is not available for remote models")


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", None) or e)


def _result(name: str, seqs: list[Sequence], usage, total_s: float) -> RemoteResult:
    pt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else 0
    ct = int(getattr(usage, "completion_tokens", 0) or 0) if usage else 0
    return RemoteResult(name, seqs, pt, {"total_s": round(total_s, 4)}, completion_tokens=ct)
