"""Request bodies of the OpenAI-compatible API, with every parameter bounded.

Unknown fields are rejected (400), not ignored. Our extras (top_k, min_p, repetition_penalty, num_beams, ...) are
plain fields, so the official client passes them with ``extra_body``. The bounds of the generation parameters come
from ``aigckit.text.params.LIMITS`` (the CLI's and the Python API's too); where OpenAI's API documents a narrower
range (temperature <= 2, 4 stop strings) the schema keeps OpenAI's. Token ids are checked against the model's
vocabulary by the route (the schema cannot know it).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from aigckit.text.params import LIMITS

MAX_PROMPT_CHARS = 100_000
MAX_TOKENS = 4096
MAX_N = LIMITS.num_return_sequences
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+@-]{0,127}$"

ModelId = Annotated[str, Field(min_length=1, max_length=128, description="a served model id (see GET /v1/models)")]
StopStr = Annotated[str, Field(min_length=1, max_length=LIMITS.stop_chars)]
TokenId = Annotated[int, Field(description="a token id in [0, vocabulary size of the model)")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Sampling parameters shared by completions and chat (OpenAI names, then aigckit extras)."""

    temperature: float | None = Field(None, ge=0, le=2, description="0 (or below 1e-5) = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="sequences to return")
    stop: StopStr | Annotated[list[StopStr], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=LIMITS.seed)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported; see repetition_penalty")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported; see repetition_penalty")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    # aigckit extras
    top_k: int | None = Field(None, ge=0, le=100_000, description="keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=LIMITS.repetition_penalty[0], le=LIMITS.repetition_penalty[1],
                                             description="> 1 discourages repeats (1 = off)")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=LIMITS.no_repeat_ngram_size)
    num_beams: int | None = Field(None, ge=1, le=LIMITS.num_beams, description="beam search width (not with stream; "
                                  "at most --max-batch)")
    length_penalty: float | None = Field(None, ge=-LIMITS.length_penalty, le=LIMITS.length_penalty)
    early_stopping: bool | Literal["never"] | None = None
    ignore_eos: bool | None = None


class CompletionRequest(_Sampling):
    model: ModelId
    prompt: (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
             | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=16)]
             | Annotated[list[TokenId], Field(min_length=1, max_length=32_768)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1, max_length=32_768)]],
                         Field(min_length=1, max_length=16)])
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS, description="clamped to the context window")
    logprobs: int | None = Field(None, ge=0, le=0, description="0: log-probability of each sampled token")
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)] | None
    name: str | None = Field(None, max_length=64)


class ChatCompletionRequest(_Sampling):
    model: ModelId
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="default: up to 256, within the context")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="only 0 (the sampled token's log-probability)")


class EmbeddingRequest(_Strict):
    model: ModelId
    input: (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
            | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=256)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=8192, description="must equal the model's dimension if given")
    user: str | None = Field(None, max_length=256)


class ImageRequest(_Strict):
    model: ModelId
    prompt: str = Field("", max_length=1000, description="free text for text-conditioned runs; class name or index "
                        "for class-conditional runs (empty: cycle through the classes); ignored by unconditional runs")
    negative_prompt: str | None = Field(None, max_length=1000, description="text-conditioned runs: what guidance "
                                        "steers away from (aigckit extra)")
    n: int = Field(1, ge=1, le=16)
    size: Annotated[str, Field(pattern=r"^[0-9]{1,4}x[0-9]{1,4}$")] | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    # aigckit extras
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1, le=1000, description="diffusion sampling steps (DDIM)")
    guidance: float | None = Field(None, ge=0, le=50, description="classifier-free guidance scale (diffusion)")
    sampler: Literal["ddim", "ddpm"] | None = None
