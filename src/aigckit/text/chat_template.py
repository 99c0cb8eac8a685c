"""Chat templates from model files, rendered in a sandbox with resource limits.

A chat template is code from the model file (GGUF metadata, tokenizer_config.json). It renders in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` with the globals and filters transformers adds (``raise_exception``,
``strftime_now``, a non-HTML-escaping ``tojson``, ``loopcontrols``), so the text equals transformers'
``apply_chat_template(..., tokenize=False)``, and under limits, so a hostile or broken template cannot hang or
exhaust the process:

- **steps**: Python line and call events while rendering (``sys.settrace``, this thread only), at most
  ``MAX_STEPS`` plus ``STEPS_PER_MESSAGE`` per message; and at most ``MAX_SECONDS`` of wall time;
- **size**: the output, and any single string or list the template builds, at most ``MAX_OUTPUT`` characters plus 4x
  the characters of the inputs; everything the size-multiplying operations build (``*``, ``+``, ``~``, ``%``,
  ``center``, ``replace``, ``join``, ``format``, block ``set``s, ...) together at most 16x that. Sizes are checked
  *before* an operation allocates;
- **range**: at most 100,000 items (jinja's own sandbox bound);
- **source**: at most ``MAX_SOURCE`` characters, self-contained (``{% include %}``, ``{% import %}``,
  ``{% from %}``, ``{% extends %}`` are refused: there is nothing to load them from).

``ChatTemplate(source)`` compiles and checks the source and renders a trial conversation, so a template that fails
for any input (syntax, include, a limit) is refused when the model loads. Every failure is one ``AigcError``:
``CorruptFileError`` at load, ``AigcError("chat template ...")`` at render.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from aigckit.errors import AigcError, CorruptFileError

__all__ = ["ChatTemplate", "TemplateLimitError", "MAX_OUTPUT", "MAX_STEPS", "MAX_SECONDS", "MAX_SOURCE"]

MAX_SOURCE = 262_144  # characters of template source (real templates are < 40 KB)
MAX_OUTPUT = 1_000_000  # characters of output (and of any one value), plus 4x the input characters
ALLOC_FACTOR = 16  # all size-multiplying operations together: 16x the output limit
MAX_STEPS = 1_000_000  # Python line + call events per render ...
STEPS_PER_MESSAGE = 1_000  # ... plus this many per message
MAX_SECONDS = 5.0
MAX_INT_BITS = 65_536  # integers the template computes

# A trial conversation rendered at load: a template that breaks a limit or the sandbox here breaks it for everyone.
TRIALS = (
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}],
)


class TemplateLimitError(BaseException):
    """A render went over a limit. A BaseException on purpose: neither jinja nor template code may swallow it."""


class TemplateRaised(jinja2.exceptions.TemplateError):
    """The template's own ``raise_exception(message)``: it refuses these messages."""


# ----------------------------------------------------------------------------------------------- the budget


class _Budget:
    """Limits of one render (thread-local while it runs)."""

    def __init__(self, input_chars: int, n_messages: int) -> None:
        self.max_value = MAX_OUTPUT + 4 * input_chars
        self.alloc_left = ALLOC_FACTOR * self.max_value
        self.max_steps = MAX_STEPS + STEPS_PER_MESSAGE * n_messages
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise TemplateLimitError(f"ran more than {self.max_steps} steps")
        if not self.steps & 1023 and time.monotonic() > self.deadline:
            raise TemplateLimitError(f"ran longer than {MAX_SECONDS:g} s")

    def charge(self, n: int) -> None:
        if n > self.max_value:
            raise TemplateLimitError(f"builds a value of {n} characters (limit {self.max_value})")
        self.alloc_left -= n
        if self.alloc_left < 0:
            raise TemplateLimitError(f"builds more than {ALLOC_FACTOR * self.max_value} characters in all")


_local = threading.local()


def _check(n: int) -> None:
    """A value of size ``n`` is about to be built: within the render's limits? (Outside a render - jinja folding
    constants at compile time - the static per-value limit applies.)"""
    budget = getattr(_local, "budget", None)
    if budget is not None:
        budget.charge(n)
    elif n > MAX_OUTPUT:
        raise TemplateLimitError(f"builds a value of {n} characters (limit {MAX_OUTPUT})")


def _size(v: Any) -> int:
    if isinstance(v, str):
        return len(v)
    if isinstance(v, (list, tuple)):
        return len(v) + sum(len(x) for x in v if isinstance(x, str))
    return 0


def _int_bits(v: Any) -> int:
    return abs(v).bit_length() if isinstance(v, int) else 0


_DIGITS = re.compile(r"\d+")


def _format_estimate(fmt: str, args: Any) -> int:
    """A rough upper bound for a formatted string's size: literal numbers in ``fmt`` (widths, precisions) and int
    arguments (a width taken from the arguments: ``%*d``, ``{:{}}``) count in full."""
    widths = sum(int(d) if len(d) <= 12 else 10**12 for d in _DIGITS.findall(fmt))
    vals = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, (list, tuple)) else [args]
    ints = sum(abs(v) for v in vals if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 64)
    return len(fmt) + sum(_size(v) for v in vals) + widths + ints


def _str_method_estimate(s: str, name: str, args: tuple, kwargs: dict) -> int | None:
    """Result size of ``s.name(*args, **kwargs)`` for the str methods that can multiply sizes."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        return max(len(s), width) if isinstance(width, int) else None
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * max(tab, 0) if isinstance(tab, int) else None
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        hits = (len(s) + 1 if old == "" else s.count(old)) if not isinstance(count, int) or count < 0 \
            else count
        return len(s) + hits * max(len(new) - len(old), 0)
    if name == "format":
        return _format_estimate(s, list(args) + list(kwargs.values()))
    if name == "format_map":
        return _format_estimate(s, args[0] if args and isinstance(args[0], dict) else [])
    return None


# ----------------------------------------------------------------------------------------------- the environment


class _LimitedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with ``a ~ b`` routed through ``environment.bounded_join`` (size checked first)."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:  # noqa: N802 (jinja's visitor naming)
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.bounded_join({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check(_size(seq) * max(n, 0))
            if isinstance(left, int) and isinstance(right, int) and _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
                raise TemplateLimitError(f"computes an integer of more than {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and max(_int_bits(left) - 1, 0) * right > MAX_INT_BITS:
                raise TemplateLimitError(f"computes an integer of more than {MAX_INT_BITS} bits")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            _check(_format_estimate(left, right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox hands out str.format behind a wrapper
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name == "join" and args:
                items = list(args[0])  # an iterator: materialise it once, measure, then join that list
                _check(sum(_size(x) for x in items) + len(owner) * max(len(items) - 1, 0))
                args = (items, *args[1:])
            else:
                est = _str_method_estimate(owner, name, args, kwargs)
                if est is not None:
                    _check(est)
        return super().call(__context, __obj, *args, **kwargs)

    def bounded_join(self, join, parts: tuple) -> Any:
        _check(sum(len(p) if isinstance(p, str) else len(str(p)) for p in parts))
        return join(parts)

    def concat(self, parts) -> str:  # block set, macro and call bodies (``concat = environment.concat``)
        out, n = [], 0
        for p in parts:
            n += len(p)
            _check_value(n)
            out.append(p)
        _check(n)
        return "".join(out)


def _check_value(n: int) -> None:
    budget = getattr(_local, "budget", None)
    limit = budget.max_value if budget is not None else MAX_OUTPUT
    if n > limit:
        raise TemplateLimitError(f"builds a value of more than {limit} characters")


def _limited_filter(func, estimate):
    """``func`` (a jinja filter), refusing calls whose result ``estimate(*args, **kwargs)`` says is too big."""

    @functools.wraps(func)  # keeps jinja's pass_eval_context / pass_environment marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        est = estimate(*args, **kwargs)
        if est is not None:
            _check(est)
        return func(*args, **kwargs)

    return wrapper


def _indent_estimate(s, width=4, first=False, blank=False):
    w = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
    return len(str(s)) + max(w, 0) * (str(s).count("\n") + 1)


def _wordwrap_estimate(environment, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    return len(str(s)) * (1 + len(str(wrapstring or "\n")))  # a line break after every character at worst


def _join_filter(func):
    @functools.wraps(func)
    def wrapper(eval_ctx, value, d="", attribute=None):
        items = list(value)
        _check(sum(len(x) if isinstance(x, str) else 16 for x in items) + len(str(d)) * max(len(items) - 1, 0))
        return func(eval_ctx, items, d, attribute)

    return wrapper


def _environment() -> _LimitedEnvironment:
    def raise_exception(message):
        raise TemplateRaised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
            raise TemplateLimitError("asks for a tojson indent larger than 64")
        out = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        _check(len(out))
        return out

    def strftime_now(fmt):
        _check(len(str(fmt)) * 8)  # each directive grows to a few characters at most
        return datetime.now().strftime(fmt)

    env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    f = env.filters
    f["tojson"] = tojson
    f["center"] = _limited_filter(f["center"], lambda value, width=80: max(len(str(value)), width)
                                  if isinstance(width, int) else None)
    f["indent"] = _limited_filter(f["indent"], _indent_estimate)
    f["format"] = _limited_filter(f["format"], lambda value, *a, **k: _format_estimate(str(value),
                                                                                      list(a) + list(k.values())))
    f["replace"] = _limited_filter(f["replace"], lambda ctx, s, old, new, count=None: _str_method_estimate(
        str(s), "replace", (str(old), str(new), -1 if count is None else count), {}))
    f["wordwrap"] = _limited_filter(f["wordwrap"], _wordwrap_estimate)
    f["join"] = _join_filter(f["join"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now

    def bounded_range(*args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise TemplateLimitError(f"asks for range() of {len(r)} items (limit {MAX_RANGE})")
        return r

    lipsum = env.globals["lipsum"]

    def bounded_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's parameter names)
        if not all(isinstance(v, int) for v in (n, min, max)) or n > 100 or max > 1000:
            raise TemplateLimitError("asks for lipsum() beyond 100 paragraphs of 1000 words")
        return lipsum(n=n, html=html, min=min, max=max)

    env.globals["range"] = bounded_range
    env.globals["lipsum"] = bounded_lipsum
    return env


# ----------------------------------------------------------------------------------------------- the template


_REFUSED_NODES = {nodes.Include: "{% include %}", nodes.Import: "{% import %}", nodes.FromImport: "{% from %}",
                  nodes.Extends: "{% extends %}"}


def _walk(budget: _Budget):
    """A trace function: counts Python call events everywhere and line events in template code."""

    def local(frame, event, arg):
        if event == "line":
            budget.tick()
        return local

    def tracer(frame, event, arg):
        budget.tick()
        return local if frame.f_code.co_filename == "<template>" else None

    return tracer


def _input_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_input_chars(k) + _input_chars(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_input_chars(v) for v in value)
    return 0


class ChatTemplate:
    """A compiled, checked chat template. ``render(**context)`` under the limits above; thread-safe."""

    def __init__(self, source: str, *, trial_context: dict | None = None) -> None:
        if not isinstance(source, str):
            raise CorruptFileError(f"the model's chat template is not a string ({type(source).__name__})")
        if len(source) > MAX_SOURCE:
            raise CorruptFileError(f"the model's chat template has {len(source)} characters (limit {MAX_SOURCE})")
        self.source = source
        env = _environment()
        try:
            tree = env.parse(source)
            for node_type, tag in _REFUSED_NODES.items():
                if next(tree.find_all(node_type), None) is not None:
                    raise CorruptFileError(f"the model's chat template uses {tag}, which aigckit refuses "
                                           "(templates must be self-contained)")
            self._template = env.from_string(source)
        except CorruptFileError:
            raise
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise CorruptFileError(f"the model's chat template does not parse: {e}") from None
        except TemplateLimitError as e:
            raise CorruptFileError(f"the model's chat template is refused: it {e}") from None
        except (jinja2.exceptions.TemplateError, RecursionError, MemoryError, ValueError, TypeError) as e:
            raise CorruptFileError(f"the model's chat template does not compile: {type(e).__name__}: {e}") from None
        for messages in TRIALS:
            self._trial(messages, trial_context or {})

    def _trial(self, messages: list[dict], context: dict) -> None:
        """Render a plain conversation: limits and sandbox escapes fail the load; the template's own refusals
        (``raise_exception``) and errors that depend on the input are left to real requests."""
        try:
            self.render(messages=messages, add_generation_prompt=True, tools=None, documents=None, **context)
        except AigcError as e:
            if isinstance(e.__cause__, (TemplateLimitError, jinja2.exceptions.SecurityError)):
                raise CorruptFileError(f"the model's chat template fails on a trial conversation: {e}") from None

    def render(self, **context: Any) -> str:
        messages = context.get("messages") or []
        budget = _Budget(_input_chars(context), len(messages) if isinstance(messages, list) else 0)
        old_trace = sys.gettrace()
        _local.budget = budget
        sys.settrace(_walk(budget))
        try:
            out, n = [], 0
            for chunk in self._template.generate(**context):
                n += len(chunk)
                if n > budget.max_value:
                    raise TemplateLimitError(f"writes more than {budget.max_value} characters")
                out.append(chunk)
            return "".join(out)
        except TemplateLimitError as e:
            error: AigcError = AigcError(f"chat template went over a limit: it {e}")
            limit = e
        except TemplateRaised as e:
            raise AigcError(f"chat template rejected the messages: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            error, limit = AigcError(f"chat template did something unsafe: {e}"), e
        except jinja2.exceptions.TemplateError as e:
            raise AigcError(f"chat template rejected the messages: {e}") from None
        except RecursionError:
            error, limit = AigcError("chat template went over a limit: it recursed too deeply"), TemplateLimitError()
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, MemoryError) as e:
            raise AigcError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(old_trace)
            _local.budget = None
        raise error from limit
