"""`aigc template` / constrain.template.render: slots filled in order under their constraints, captured values read
back, the sandbox and the errors."""

from __future__ import annotations

import json
import re

import pytest

from aigckit.cli import main
from aigckit.constrain import Regex
from aigckit.constrain.template import render
from aigckit.errors import AigcError

TEMPLATE = """Name: {{ name }}
Class: {{ select("kind", ["wizard", "knight", "thief"]) }}
Age: {{ gen("age", regex="[1-9][0-9]") }}
{% for i in range(2) %}Item {{ i }}: {{ gen("item" ~ i, regex="(sword|bow|rope)") }}
{% endfor %}{% if captured("kind") == "wizard" %}Spell{% else %}Skill{% endif %}: {{ gen("s", max_tokens=3) }}"""


def test_render_fills_slots_in_order(blm):
    res = render(blm, TEMPLATE, {"name": "Ada"}, temperature=0.8, seed=1)
    c = res.captures
    assert c["kind"] in ("wizard", "knight", "thief") and re.fullmatch("[1-9][0-9]", c["age"])
    assert c["item0"] in ("sword", "bow", "rope") and c["item1"] in ("sword", "bow", "rope")
    head = f"Name: Ada\nClass: {c['kind']}\nAge: {c['age']}\nItem 0: {c['item0']}\nItem 1: {c['item1']}\n"
    assert res.text.startswith(head)
    assert res.text == head + ("Spell" if c["kind"] == "wizard" else "Skill") + ": " + c["s"]
    assert [s["name"] for s in res.slots] == ["kind", "age", "item0", "item1", "s"]
    # a slot's prompt is the text above it: the same prefix gives the same greedy continuation
    res2 = render(blm, "Name: Ada\nAge: {{ gen('age', regex='[1-9][0-9]') }}", temperature=0)
    want = blm.generate("Name: Ada\nAge: ", temperature=0, constraint=Regex("[1-9][0-9]")).text
    assert res2.captures["age"] == want


@pytest.mark.parametrize("source,variables,param", [
    ("{{ name }}", {}, "vars"),
    ("{% if %}", {}, "template"),
    ("x {{ gen('a') }}{{ gen('a') }}", {}, "template"),
    ("x {{ gen('a', regex='(') }}", {}, "regex"),
    ("x {{ ''.__class__.__mro__[1].__subclasses__() }}", {}, "template"),
    ("{{ gen('a') }}", {}, "template"),  # nothing above the slot: no prompt
])
def test_template_errors(blm, source, variables, param):
    with pytest.raises(AigcError) as e:
        render(blm, source, variables)
    assert e.value.param == param


def test_cli_template(capsys, tmp_path, tiny_bytes_dir):
    f = tmp_path / "t.jinja"
    f.write_text('Hero {{ name }} picks {{ select("w", ["a sword", "a bow"]) }}.\n')
    rc = main(["template", str(f), "--vars", '{"name": "Bo"}', "-m", str(tiny_bytes_dir), "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and obj["text"] == f"Hero Bo picks {obj['captures']['w']}.\n" and obj["captures"]["w"] in (
        "a sword", "a bow")
    assert main(["template", str(tmp_path / "missing.jinja")]) == 2
