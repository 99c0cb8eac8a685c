"""Rule-based generation proper: a Jinja template whose slots the model fills under their constraints (a small,
clear version of what guidance does).

    {{ name }} is a {{ select("kind", ["wizard", "knight", "thief"]) }} aged {{ gen("age", regex="[0-9]{2}") }}.
    Motto: "{{ gen("motto", max_tokens=20, stop='"') }}"

The template renders top to bottom in a sandbox (``jinja2.sandbox.ImmutableSandboxedEnvironment``: no attribute
access to internals, no mutation of the variables). Each ``gen``/``select`` call generates from the text rendered
so far (the prompt is everything above the slot), and its value is written into the output and kept in
``captures[name]``; ``captured("name")`` reads an earlier slot's value back (e.g. in an ``{% if %}``).

- ``gen(name, regex=None, max_tokens=64, stop=None, temperature=None)``: free text, or a full match of ``regex``.
  Without a regex ``stop`` ends the slot (the stop string is not included).
- ``select(name, options)``: exactly one of the strings.

Slots inside ``{% set x %}...{% endset %}`` blocks, macros or filters are rendered before their surroundings are
written out, so their prompt lacks the text around them: write slots at the top level or inside ``{% for %}`` /
``{% if %}``. Limits: ``MAX_SLOTS`` slots and ``MAX_TEMPLATE_CHARS`` of template text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aigckit.constrain.constraints import Choice, Regex
from aigckit.errors import AigcError

__all__ = ["render", "TemplateResult", "MAX_SLOTS", "MAX_TEMPLATE_CHARS"]

MAX_SLOTS = 256
MAX_TEMPLATE_CHARS = 200_000
_NAME_OK = str.isidentifier


@dataclass
class TemplateResult:
    text: str
    captures: dict[str, str] = field(default_factory=dict)
    slots: list[dict[str, Any]] = field(default_factory=list)  # per slot: name, kind, text, finish_reason, tokens


def render(lm, source: str, variables: dict | None = None, *, temperature: float = 0.0, seed: int | None = None
           ) -> TemplateResult:
    """Render ``source`` with ``variables``, filling its ``gen``/``select`` slots with ``lm``."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(source, str) or not source.strip():
        raise AigcError("the template is empty", param="template")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise AigcError(f"the template is {len(source)} characters, the limit is {MAX_TEMPLATE_CHARS}",
                        param="template")
    variables = dict(variables or {})
    for reserved in ("gen", "select", "captured"):
        if reserved in variables:
            raise AigcError(f"variable {reserved!r} is reserved by the template functions", param="vars")
    parts: list[str] = []
    out = TemplateResult("")

    def _slot(name: str, kind: str) -> None:
        if not isinstance(name, str) or not _NAME_OK(name):
            raise AigcError(f"{kind}(): the slot name must be an identifier, got {name!r}", param="template")
        if name in out.captures:
            raise AigcError(f"{kind}(): slot {name!r} is already filled (names must be unique)", param="template")
        if len(out.slots) >= MAX_SLOTS:
            raise AigcError(f"more than {MAX_SLOTS} slots", param="template")

    def _run(prompt: str, **kw):
        if not prompt:
            raise AigcError("a slot needs some text before it (the prompt)", param="template")
        t = kw.pop("temperature", None)
        return lm.generate(prompt, temperature=temperature if t is None else t, seed=seed, **kw)

    def gen(name, regex=None, max_tokens=64, stop=None, temperature=None):
        _slot(name, "gen")
        kw: dict[str, Any] = {"max_new_tokens": max_tokens}
        if regex is not None:
            kw["constraint"] = Regex(regex)
        if stop is not None:
            kw["stop"] = stop
        res = _run("".join(parts), temperature=temperature, **kw)
        out.captures[name] = res.text
        out.slots.append({"name": name, "kind": "gen", "text": res.text, "finish_reason": res.finish_reason,
                          "tokens": len(res.token_ids)})
        return res.text

    def select(name, options):
        _slot(name, "select")
        if isinstance(options, str) or not isinstance(options, (list, tuple)):
            raise AigcError(f"select({name!r}, ...): options must be a list of strings", param="template")
        res = _run("".join(parts), constraint=Choice(list(options)), max_new_tokens=256, temperature=0.0)
        out.captures[name] = res.text
        out.slots.append({"name": name, "kind": "select", "text": res.text, "finish_reason": res.finish_reason,
                          "tokens": len(res.token_ids)})
        return res.text

    def captured(name):
        if name not in out.captures:
            raise AigcError(f"captured({name!r}): no such slot above this point", param="template")
        return out.captures[name]

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.globals.update(gen=gen, select=select, captured=captured)
    try:
        tmpl = env.from_string(source)
        for chunk in tmpl.generate(**variables):  # lazily: a slot's prompt is every chunk written before it
            parts.append(chunk)
    except jinja2.TemplateSyntaxError as e:
        raise AigcError(f"template syntax error on line {e.lineno}: {e.message}", param="template") from None
    except jinja2.UndefinedError as e:
        if "unsafe" in str(e.message):  # the sandbox refused an attribute
            raise AigcError(f"template: not allowed in the sandbox: {e.message}", param="template") from None
        raise AigcError(f"template: {e.message} (pass it in the variables)", param="vars") from None
    except jinja2.exceptions.SecurityError as e:
        raise AigcError(f"template: not allowed in the sandbox: {e}", param="template") from None
    out.text = "".join(parts)
    return out
