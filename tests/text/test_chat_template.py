"""Chat templates from model files render under limits: hostile or broken templates fail with one clear error
(at load where the failure does not depend on the messages), normal templates render exactly as before."""

from __future__ import annotations

import sys
import threading

import pytest

from aigckit.errors import AigcError, CorruptFileError
from aigckit.text import chat_template as ct
from aigckit.text.chat_template import ChatTemplate

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MSGS = [{"role": "user", "content": "hi"}]


def render(t: ChatTemplate, messages=MSGS, **kw) -> str:
    return t.render(messages=messages, add_generation_prompt=True, tools=None, documents=None, **kw)


HOSTILE_AT_LOAD = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "3 GB string": "{{ 'x' * 3000000000 }}",
    "string times computed int": "{{ 'x' * (3 * 1000000000) }}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "include": "{% include 'other.jinja' %}",
    "import": "{% import 'macros.jinja' as m %}",
    "from import": "{% from 'macros.jinja' import f %}",
    "extends": "{% extends 'base.jinja' %}",
    "doubling with ~": "{% set ns = namespace(s='x' * 100000) %}{% for i in range(40) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='x' * 100000) %}{% for i in range(40) %}"
                       "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling with block set": "{% set s = 'x' * 100000 %}" + "{% set s %}{{ s }}{{ s }}{% endset %}" * 40,
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "center": "{{ 'x'|center(1000000000) }}",
    "str.ljust": "{{ 'x'.ljust(2000000000) }}",
    "printf width": "{{ '%0999999999d' % 1 }}",
    "printf star width": "{{ '%*d' % (999999999, 1) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "replace amplification": "{{ ('x' * 100000).replace('x', 'x' * 100000) }}",
    "replace filter": "{{ ('x' * 100000)|replace('x', 'y' * 100000) }}",
    "indent": "{{ 'a\nb'|indent(1000000000) }}",
    "join of many": "{{ range(100000)|map('string')|map('center', 10000)|join }}",
    "lipsum": "{{ lipsum(1000000) }}",
    "big power": "{{ 10 ** 100000000 }}",
    "big product": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "output loop": "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}",
    "syntax error": "{% for m in messages %}{{ m['content'] }",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_AT_LOAD))
def test_hostile_template_is_refused_at_load_with_one_line(name):
    with pytest.raises(CorruptFileError) as e:
        ChatTemplate(HOSTILE_AT_LOAD[name])
    msg = str(e.value)
    assert msg.startswith("the model's chat template") and "\n" not in msg, msg
    if name != "output loop":  # sizes are checked before building a value, not after writing it
        assert "writes more than" not in msg, msg


def test_refusals_say_why():
    with pytest.raises(CorruptFileError, match=r"uses \{% include %\}"):
        ChatTemplate(HOSTILE_AT_LOAD["include"])
    with pytest.raises(CorruptFileError, match="range\\(\\) of 1000000000 items"):
        ChatTemplate(HOSTILE_AT_LOAD["huge range"])
    with pytest.raises(CorruptFileError, match="steps"):
        ChatTemplate(HOSTILE_AT_LOAD["nested range loops"])
    with pytest.raises(CorruptFileError, match="characters"):
        ChatTemplate(HOSTILE_AT_LOAD["3 GB string"])
    with pytest.raises(CorruptFileError, match="does not parse"):
        ChatTemplate(HOSTILE_AT_LOAD["syntax error"])
    with pytest.raises(CorruptFileError, match="limit 262144"):
        ChatTemplate("x" * (ct.MAX_SOURCE + 1))


def test_input_dependent_failures_are_one_aigc_error_at_render():
    t = ChatTemplate("{% if messages|length > 3 %}{% for i in range(100000) %}{% for j in range(100000) %}"
                     "{% endfor %}{% endfor %}{% endif %}" + CHATML)  # the trial conversations pass
    with pytest.raises(AigcError, match="went over a limit: it ran more than"):
        render(t, MSGS * 4)
    boom = ChatTemplate("{% if messages[0]['content'] == 'x' %}{{ 1 // 0 }}{% endif %}ok")
    with pytest.raises(AigcError, match="failed on these messages: ZeroDivisionError"):
        render(boom, [{"role": "user", "content": "x"}])
    own = ChatTemplate("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                       + CHATML)  # the template's own refusal is not a load failure
    with pytest.raises(AigcError, match="rejected the messages: no system role"):
        render(own, [{"role": "system", "content": "s"}])
    big = ChatTemplate("{{ messages[0]['content'] * 3 }}")
    assert len(render(big, [{"role": "user", "content": "z" * 400_000}])) == 1_200_000  # limits grow with input


def test_normal_templates_render_as_before_and_tracing_is_restored():
    t = ChatTemplate(CHATML)
    assert render(t) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render(ChatTemplate("{{ 'a' * 3 }}|{{ [1, 2] + [3] }}|{{ '%05d|%s' % (42, 'x') }}|{{ 'x'|center(5) }}|"
                               "{{ 2 ** 10 }}|{{ ['a', 'b']|join(', ') }}|{{ 'ab'.replace('a', 'c') }}|"
                               "{{ '{}-{}'.format(1, 2) }}|{{ 'a' ~ 1 ~ 'b' }}")) == \
        "aaa|[1, 2, 3]|00042|x|  x  |1024|a, b|cb|1-2|a1b"
    seen = []

    def outer(frame, event, arg):
        seen.append(event)
        return None

    sys.settrace(outer)
    try:
        render(t)
        with pytest.raises(AigcError):
            render(ChatTemplate("{% if messages|length > 1 %}{{ 'x' * 10**9 }}{% endif %}"), MSGS * 2)
        assert sys.gettrace() is outer
    finally:
        sys.settrace(None)


def test_limits_are_per_thread():
    """A render over its limit in one thread does not disturb a render in another."""
    slow = ChatTemplate("{% if messages|length > 3 %}{% for i in range(100000) %}{% for j in range(100000) %}"
                        "{% endfor %}{% endfor %}{% endif %}")
    ok = ChatTemplate(CHATML)
    errors, outs = [], []

    def bad():
        try:
            render(slow, MSGS * 4)
        except AigcError as e:
            errors.append(str(e))

    th = threading.Thread(target=bad)
    th.start()
    for _ in range(50):
        outs.append(render(ok))
    th.join()
    assert errors and "over a limit" in errors[0]
    assert set(outs) == {"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}
