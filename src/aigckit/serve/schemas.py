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
from aigckit.trust.watermark import Watermark

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


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    schema_: dict | None = Field(None, alias="schema", description="a JSON Schema; the output always follows it")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class WatermarkSpec(_Strict):
    key: str = Field(min_length=1, max_length=256)
    gamma: float = Field(0.5, gt=0, lt=1)
    delta: float = Field(2.0, ge=0, le=100)
    context_width: int = Field(1, ge=1, le=16)
    self_hash: bool = False
    min_entropy: float = Field(Watermark.min_entropy, ge=0, le=20,
                               description="mark only steps with at least this entropy (nats)")


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
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrained "
                                                   "decoding (the output parses and validates)")
    watermark: bool | Annotated[str, Field(min_length=1, max_length=256)] | WatermarkSpec | None = Field(
        None, description="KGW watermark: true = the server's key, a key string, or {key, gamma, delta, "
                          "context_width, self_hash}; a server with its own key marks every response")


class CompletionRequest(_Sampling):
    model: ModelId
    prompt: (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
             | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=16)]
             | Annotated[list[TokenId], Field(min_length=1, max_length=32_768)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1, max_length=32_768)]],
                         Field(min_length=1, max_length=16)])
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS, description="clamped to the context window; 0 with "
                                   "echo: only the prompt (and its logprobs)")
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probability of each token, and the N most "
                                 "likely tokens at each position (0-5); with echo also the prompt's")
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class FunctionCall(_Strict):
    name: str = Field(..., max_length=64)
    arguments: str = Field(..., max_length=MAX_PROMPT_CHARS)


class ToolCall(_Strict):
    id: str = Field(..., max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Strict):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(..., max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)] | None
    name: str | None = Field(None, max_length=64)
    tool_calls: Annotated[list[ToolCall], Field(max_length=64)] | None = None
    tool_call_id: str | None = Field(None, max_length=128)


class ChatCompletionRequest(_Sampling):
    model: ModelId
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="default: up to 256, within the context")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the N most likely tokens at "
                                     "each position (0-20)")
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


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


class VoiceRef(_Strict):
    id: str = Field(min_length=1, max_length=128)


class SpeechRequest(_Strict):
    """POST /v1/audio/speech (OpenAI's fields, then aigckit extras)."""

    model: ModelId = Field(description="a served voice id (see GET /v1/models, kind speech)")
    input: str = Field(min_length=1, max_length=4096, description="the text to say")
    voice: Annotated[str, Field(min_length=1, max_length=128)] | VoiceRef = Field(
        description="a speaker of the model: 'default' or the model id for one-speaker voices (see its card)")
    instructions: str | None = Field(None, max_length=4096, description="not supported by VITS voices: must be empty")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = Field(
        "mp3", description="wav and pcm always; flac, mp3, opus with the soundfile package; aac not supported")
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # aigckit extras
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same audio (default: random)")
    noise_scale: float | None = Field(None, ge=0, le=2, description="voice variation (default: the voice's)")
    noise_w: float | None = Field(None, ge=0, le=2, description="rhythm variation (default: the voice's)")


class DetectRequest(_Strict):
    """POST /v1/detect (aigckit extension): test a text for a KGW watermark and/or zero-shot for AI generation."""

    model: ModelId = Field(description="a served text model: its tokenizer (and, for zero_shot, its weights)")
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    key: str | None = Field(None, min_length=1, max_length=256, description="default: the server's key")
    gamma: float | None = Field(None, gt=0, lt=1)
    context_width: int | None = Field(None, ge=1, le=16)
    self_hash: bool | None = None
    min_entropy: float | None = Field(None, ge=0, le=20, description="the watermark's entropy gate in nats "
                                      "(default: the server's watermark's, else the library default)")
    entropy_gated: bool = Field(True, description="score only the steps at or above the gate, with the served "
                                "model's entropies (false: every token; no model pass, less power)")
    fpr: float = Field(1e-3, gt=0, lt=1, description="false-positive rate of the verdict")
    ignore_repeated: bool = True
    window: int | None = Field(None, ge=1, le=100_000, description="also test windows of this many tokens")
    zero_shot: bool = Field(False, description="also run the zero-shot detector (no key)")
