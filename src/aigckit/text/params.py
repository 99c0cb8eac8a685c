"""Generation parameters as one validated value, and the limits every front end shares.

``GenerationParams`` is a frozen dataclass that validates itself when it is made, so a value that exists is a valid
one: ``LM.generate``, the scheduler and the server take it as it is and never re-check it per call or per decode
step. Make one directly, or from another with overrides::

    p = GenerationParams(temperature=0, max_new_tokens=32)
    q = GenerationParams.make(p, seed=1)          # = dataclasses.replace(p, seed=1), validated again
    lm.generate("Hello", p)                       # or lm.generate("Hello", temperature=0, max_new_tokens=32)

``LIMITS`` bounds every parameter for the CLI, the Python API and the server alike (the server's request schema is
built from it; where OpenAI's API documents a narrower range, e.g. temperature <= 2, the schema keeps OpenAI's).
Errors are ``AigcError`` with ``param`` set to the field's name.

To add a parameter (constrained decoding, watermarks, tools ...): add a field with a default that means "off", check
it in ``validate`` with ``_fail(name, ...)``, and read it where it acts (``engine.RowState`` holds per-request state
between decode steps). This module imports no torch: the CLI and remote models validate without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from typing import Any

from aigckit.errors import AigcError

MAX_NEW_TOKENS_DEFAULT = 256  # when max_new_tokens is not given (local and remote models)

# Temperatures in (0, TEMPERATURE_FLOOR) decode greedily, as temperature 0 does: greedy is the limit of sampling as
# the temperature goes to 0, and below the floor the scaled logits are no longer safe in float32 (logits / 1e-40
# overflow to inf, and softmax of inf is NaN). At the floor a logit gap of 1e-3 is already a factor e^-100, so
# the switch is invisible; 1e-5 is also vLLM's threshold for greedy.
TEMPERATURE_FLOOR = 1e-5


@dataclass(frozen=True)
class Limits:
    """Upper (and lower) bounds on generation parameters; work beyond them is refused with a clear error."""

    num_beams: int = 32
    num_return_sequences: int = 64
    temperature: float = 100.0  # above this the distribution is uniform noise
    repetition_penalty: tuple[float, float] = (0.01, 10.0)  # keeps scores / penalty finite in float32
    length_penalty: float = 10.0  # |length_penalty|
    no_repeat_ngram_size: int = 64
    stop: int = 16  # stop strings per request
    stop_chars: int = 256  # characters per stop string
    seed: int = 2**63 - 1
    top_logprobs: int = 20


LIMITS = Limits()


def _fail(param: str, message: str) -> AigcError:
    return AigcError(message, param=param)


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if not _is_int(value):
        raise _fail(name, f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise _fail(name, f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise _fail(name, f"{name} must be <= {hi} (the limit), got {value}")


def check_sampling(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0) -> None:
    """The checks of the sampling knobs (used by ``GenerationParams`` and ``aigckit.text.sampling.validate``)."""
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                    ("repetition_penalty", repetition_penalty)):
        if not _is_real(v):
            raise _fail(name, f"{name} must be a number, got {v!r}")
    if not temperature >= 0:  # also catches NaN
        raise _fail("temperature", f"temperature must be >= 0, got {temperature}")
    if not temperature <= LIMITS.temperature:  # also catches inf
        raise _fail("temperature", f"temperature must be <= {LIMITS.temperature:g} (a finite number), got {temperature}")
    if not _is_int(top_k) or top_k < 0:
        raise _fail("top_k", f"top_k must be a non-negative integer (0 disables), got {top_k}")
    if not 0 < top_p <= 1:
        raise _fail("top_p", f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise _fail("min_p", f"min_p must be in [0, 1], got {min_p}")
    lo, hi = LIMITS.repetition_penalty
    if not lo <= repetition_penalty <= hi:
        raise _fail("repetition_penalty", f"repetition_penalty must be in [{lo:g}, {hi:g}] (1 = off), got "
                                          f"{repetition_penalty}")


@dataclass(frozen=True)
class GenerationParams:
    """How to generate; validated when made (see the module docstring)."""

    max_new_tokens: int | None = None  # default: MAX_NEW_TOKENS_DEFAULT, limited by max_length / the context
    max_length: int | None = None  # prompt + generated tokens
    temperature: float = 0.7  # 0 (or below TEMPERATURE_FLOOR) = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)  # a str or list is accepted and stored as a tuple
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the k most likely tokens at each step (0-20, OpenAI's range)
    ignore_eos: bool = False
    # logits processors (grammar masks, watermarks, ...): immutable values, see aigckit.text.processors
    processors: tuple[Any, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.processors, list):
            object.__setattr__(self, "processors", tuple(self.processors))
        self.validate()

    @classmethod
    def make(cls, params: GenerationParams | None = None, /, **overrides: Any) -> GenerationParams:
        """``params`` (default: the defaults) with ``overrides`` applied; unknown names raise. Without overrides
        ``params`` itself is returned: it was validated when it was made."""
        if params is not None and not isinstance(params, GenerationParams):
            raise AigcError(f"params must be a GenerationParams, got {type(params).__name__}; pass single "
                            "parameters as keyword arguments", param="params")
        if not overrides:
            return params if params is not None else _DEFAULT
        bad = sorted(set(overrides) - _FIELDS)
        if bad:
            raise AigcError(f"unknown generation parameter(s): {', '.join(bad)}", param=bad[0])
        return replace(params if params is not None else _DEFAULT, **overrides)

    @property
    def greedy(self) -> bool:
        """Argmax decoding (temperature 0, or below ``TEMPERATURE_FLOOR``)."""
        return self.temperature < TEMPERATURE_FLOOR

    def validate(self) -> None:
        """Raise ``AigcError`` (with ``param``) for any value outside ``LIMITS``; never clamps."""
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                       repetition_penalty=self.repetition_penalty)
        if self.max_new_tokens is not None:
            check_int("max_new_tokens", self.max_new_tokens, 1)
        if self.max_length is not None:
            check_int("max_length", self.max_length, 1)
        check_int("num_beams", self.num_beams, 1, LIMITS.num_beams)
        check_int("num_return_sequences", self.num_return_sequences, 1, LIMITS.num_return_sequences)
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise _fail("num_return_sequences", f"num_return_sequences ({self.num_return_sequences}) must be <= "
                                                 f"num_beams ({self.num_beams})")
        check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, LIMITS.no_repeat_ngram_size)
        if not _is_real(self.length_penalty) or not math.isfinite(self.length_penalty) \
                or abs(self.length_penalty) > LIMITS.length_penalty:
            raise _fail("length_penalty", f"length_penalty must be a finite number in [-{LIMITS.length_penalty:g}, "
                                          f"{LIMITS.length_penalty:g}], got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise _fail("early_stopping", f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if not isinstance(self.stop, tuple):
            raise _fail("stop", f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise _fail("stop", "stop strings must be non-empty strings")
        if len(self.stop) > LIMITS.stop:
            raise _fail("stop", f"at most {LIMITS.stop} stop strings, got {len(self.stop)}")
        if any(len(s) > LIMITS.stop_chars for s in self.stop):
            raise _fail("stop", f"stop strings must be at most {LIMITS.stop_chars} characters")
        if self.seed is not None:
            check_int("seed", self.seed, 0, LIMITS.seed)
        for name in ("logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        check_int("top_logprobs", self.top_logprobs, 0, LIMITS.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise _fail("top_logprobs", "top_logprobs needs logprobs")
        if not isinstance(self.processors, tuple):
            raise _fail("processors", f"processors must be a tuple of logits processors, got "
                                      f"{type(self.processors).__name__}")
        for proc in self.processors:
            if not callable(getattr(proc, "start", None)):
                raise _fail("processors", f"a logits processor needs a start(prompt, tokenizer, vocab_size) method "
                                          f"(aigckit.text.processors), got {type(proc).__name__}")

    def budget(self, prompt_len: int, context: int) -> int:
        """How many tokens this prompt may generate; raises if the prompt leaves no room."""
        if prompt_len >= context:
            raise _fail("prompt", f"prompt is {prompt_len} tokens, the context window is {context}: nothing left "
                                  "to generate")
        room = context - prompt_len
        if self.max_length is not None:
            if self.max_length <= prompt_len:
                raise _fail("max_length", f"max_length {self.max_length} leaves no room after the {prompt_len}-token "
                                          "prompt")
            room = min(room, self.max_length - prompt_len)
        want = self.max_new_tokens if self.max_new_tokens is not None else MAX_NEW_TOKENS_DEFAULT
        return min(want, room)


def with_constraint(params: GenerationParams | None, overrides: dict[str, Any]) -> GenerationParams:
    """``GenerationParams.make(params, **overrides)`` where ``constraint=`` (an ``aigckit.constrain`` value) and
    ``watermark=`` (e.g. ``aigckit.trust.Watermark(key)``) are conveniences for appending a logits processor to
    ``processors`` (constraint first: a watermark then only biases tokens the constraint allows)."""
    extra = []
    for name in ("constraint", "watermark"):
        proc = overrides.pop(name, None)
        if proc is None:
            continue
        if not callable(getattr(proc, "start", None)):
            raise AigcError(f"{name} must be a logits processor (e.g. aigckit.constrain.JsonSchema(...) or "
                            f"aigckit.trust.Watermark(key)), got {type(proc).__name__}", param=name)
        extra.append(proc)
    p = GenerationParams.make(params, **overrides)
    return GenerationParams.make(p, processors=p.processors + tuple(extra)) if extra else p


_FIELDS = frozenset(f.name for f in fields(GenerationParams))
_DEFAULT = GenerationParams()
