"""Constraints steer every decoding mode of a (random) model into the grammar: JSON Schema, Pydantic models, regexes,
Lark and GBNF grammars, choices; EOS only where the grammar accepts; bad inputs are one-line AigcErrors."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from pydantic import BaseModel

from aigckit.constrain import Choice, Grammar, JsonSchema, Regex, RunLimits
from aigckit.constrain import matcher
from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams
from aigckit.text.scheduler import Scheduler

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "pos": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10},
                                                  "ok": {"type": "boolean"}},
                "required": ["x", "ok"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "pos"],
    "additionalProperties": False,
}
MODES = [dict(temperature=0), dict(temperature=1.0, seed=1), dict(num_beams=3, temperature=0),
         dict(num_return_sequences=2, temperature=1.2, seed=4)]


def _valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("kw", MODES, ids=["greedy", "sample", "beam", "n2"])
def test_json_schema_every_mode(blm, kw):
    res = blm.generate("Describe a person:", constraint=JsonSchema(NESTED), max_new_tokens=400, **kw)
    assert res.sequences
    for seq in res.sequences:
        assert seq.finish_reason == "stop", seq
        _valid(seq.text, NESTED)


class Pet(BaseModel):
    kind: str
    legs: int
    vaccinated: bool


def test_pydantic_model_is_a_schema(blm):
    c = JsonSchema(Pet)
    assert c == JsonSchema(Pet.model_json_schema())  # the same value (and the same cached grammar)
    p = GenerationParams(temperature=0.9, seed=0, max_new_tokens=120)
    res = blm.generate("pet", p, constraint=JsonSchema({**Pet.model_json_schema(), "properties": {
        "kind": {"type": "string", "maxLength": 5}, "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "vaccinated": {"type": "boolean"}}, "additionalProperties": False}))
    assert res.finish_reason == "stop"
    Pet.model_validate_json(res.text)


@pytest.mark.parametrize("c,check", [
    (Regex(r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    (Grammar('start: "(" expr ")"\nexpr: /[a-z]/ | "(" expr ")"'), lambda t: re.fullmatch(r"\(+[a-z]\)+", t)
     and t.count("(") == t.count(")")),
    (Grammar('root ::= ("yes" | "no") " " [0-9]'), lambda t: re.fullmatch(r"(yes|no) [0-9]", t)),
    (Choice(["true", "false", "maybe"]), lambda t: t in ("true", "false", "maybe")),
], ids=["regex", "lark", "gbnf", "choice"])
@pytest.mark.parametrize("kw", [dict(temperature=1.0, seed=2), dict(num_beams=2, temperature=0)], ids=["sample", "beam"])
def test_regex_grammar_choice(blm, c, check, kw):
    res = blm.generate("x", constraint=c, max_new_tokens=40, **kw)
    for seq in res.sequences:
        assert seq.finish_reason == "stop" and check(seq.text), seq


def test_eos_only_where_the_grammar_accepts(blm):
    tok = blm.tokenizer
    eos = sorted(tok.eos_token_ids)
    st = Regex("ab(cd)?").start([1], tok, blm.config.vocab_size)
    assert not st.allowed()[eos].any()  # nothing matched yet: no end
    for t in tok.encode("ab"):
        st.advance(t)
    assert st.allowed()[eos].all() and st.accepting  # "ab" is a full match: ending is allowed (or "cd")
    st.advance(tok.encode("c")[0])
    assert not st.allowed()[eos].any()
    # cut by the budget before the grammar accepts: "length", never "stop"
    r = blm.generate("x", constraint=Regex("abcabcabc"), max_new_tokens=2, temperature=0)
    assert r.finish_reason == "length" and "abcabcabc".startswith(r.text)
    r = blm.generate("x", constraint=Regex("abcabcabc"), max_new_tokens=20, temperature=0)
    assert (r.finish_reason, r.text) == ("stop", "abcabcabc")


def test_whitespace_is_bounded(blm):
    tok, V = blm.tokenizer, blm.config.vocab_size

    def ok(c, text):
        st = c.start([1], tok, V)
        for t in tok.encode(text):
            st.advance(t)
        return st.error is None

    obj = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert ok(JsonSchema(obj), '{"a": 1}') and ok(JsonSchema(obj), '{\n  "a": 1\n}')
    assert not ok(JsonSchema(obj), '{"a":' + " " * 30)  # runaway whitespace is not in the grammar
    assert not ok(JsonSchema(obj), "{\n\n\n")
    assert ok(JsonSchema(obj, whitespace="flexible"), '{"a":' + " " * 30)
    assert not ok(JsonSchema(obj, whitespace="compact"), '{"a": 1')


def test_scheduler_batch_mixes_constrained_and_free_rows(blm):
    sched = Scheduler(blm, max_batch=8)
    try:
        free = GenerationParams(temperature=0, max_new_tokens=12, ignore_eos=True)
        js = GenerationParams(temperature=0.8, seed=3, max_new_tokens=160, processors=(JsonSchema(NESTED),))
        rx = GenerationParams(temperature=0, max_new_tokens=20, processors=(Regex("(ab){2,3}"),))
        hs = [sched.submit(blm.encode("a"), free), sched.submit(blm.encode("b"), js), sched.submit(blm.encode("c"), rx),
              sched.submit(blm.encode("d"), js)]
        outs = []
        for h in hs:
            evs = list(h)
            outs.append(("".join(e.text or "" for e in evs), [e.token_id for e in evs if e.token_id is not None],
                         evs[-1].finish_reason))
        assert outs[0][1] == blm.generate("a", free).token_ids  # the free row is untouched by its neighbours
        for text, _, reason in (outs[1], outs[3]):
            assert reason == "stop"
            _valid(text, NESTED)
        assert outs[2][2] == "stop" and re.fullmatch("(ab){2,3}", outs[2][0])
        beams = sched.generate_beam(blm.encode("e"), GenerationParams.make(js, num_beams=2, temperature=0))
        _valid(blm.tokenizer.decode(beams[0].token_ids[:-1] if beams[0].token_ids[-1] in blm.tokenizer.eos_token_ids
                                    else beams[0].token_ids), NESTED)
    finally:
        sched.close()


@pytest.mark.parametrize("make,param", [
    (lambda: JsonSchema({"type": "frob"}), "json_schema"),
    (lambda: JsonSchema("{not json"), "json_schema"),
    (lambda: JsonSchema({"type": "object", "if": {"type": "object"}}), "json_schema"),  # unsupported keyword
    (lambda: Regex("a(b"), "regex"),
    (lambda: Grammar("start: undefined_rule"), "grammar"),
    (lambda: Grammar("root ::= foo"), "grammar"),
    (lambda: Choice([]), "choices"),
])
def test_invalid_constraints_are_one_line_errors(make, param):
    with pytest.raises(AigcError) as e:
        make()
    assert e.value.param == param
    assert "\n" not in str(e.value) and str(e.value)


def test_compiled_grammars_are_cached(blm):
    schema = {"type": "object", "properties": {"cache_probe": {"type": "integer"}}}
    before = matcher.cache_info()
    for _ in range(3):
        JsonSchema(schema).start([1], blm.tokenizer, blm.config.vocab_size)
    after = matcher.cache_info()
    assert after["compiles"] - before["compiles"] == 1 and after["hits"] - before["hits"] == 2


def test_constraint_keyword_and_processor_checks(blm):
    p = GenerationParams(temperature=0, max_new_tokens=8)
    assert blm.generate("x", p, constraint=Choice(["no"])).text == "no"
    assert "".join(blm.stream("x", p, constraint=Choice(["yes"]))) == "yes"
    with pytest.raises(AigcError):
        blm.generate("x", p, constraint="not a constraint")


def test_padded_model_vocabulary_is_masked(blm):
    """A model whose vocabulary is padded past the tokenizer's: the padding ids are never allowed."""
    V = blm.config.vocab_size + 5
    st = JsonSchema({"type": "object"}).start([1], blm.tokenizer, V)
    ok = st.allowed()
    assert ok.shape == (V,) and ok[:V - 5].any() and not ok[V - 5:].any()


def _walk(c, tok, V, text):
    st = c.start([1], tok, V)
    for t in tok.encode(text):
        st.advance(t)
    return st


def _allows(st, tok, piece: str) -> bool:
    ids = tok.encode(piece)
    return len(ids) == 1 and bool(st.allowed()[ids[0]])


def test_repetition_is_bounded(blm):
    """Digit runs and repeated characters stop at the RunLimits while the grammar allows anything else; a schema
    that demands a longer run still gets it; runs=None turns the guard off."""
    tok, V = blm.tokenizer, blm.config.vocab_size
    num = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    st = _walk(JsonSchema(num), tok, V, '{"x": 0.' + "3" * 20)
    assert not _allows(st, tok, "3") and _allows(st, tok, "}") and _allows(st, tok, "e")
    st = _walk(JsonSchema(num), tok, V, '{"x": 0.' + "3" * 19)
    assert _allows(st, tok, "3")
    st = _walk(JsonSchema(num, runs=None), tok, V, '{"x": 0.' + "3" * 40)
    assert _allows(st, tok, "3")
    st = _walk(JsonSchema(num, runs=RunLimits(max_digits=5)), tok, V, '{"x": 12345')
    assert not _allows(st, tok, "6") and _allows(st, tok, ".")
    s = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    st = _walk(JsonSchema(s), tok, V, '{"s": "' + "a" * 24)
    assert not _allows(st, tok, "a") and _allows(st, tok, "b") and _allows(st, tok, '"')
    st = _walk(JsonSchema(s), tok, V, '{"s": "' + "a" * 23)
    assert _allows(st, tok, "a")
    # a pattern that needs 30 digits: the guard must not make it impossible
    pat = {"type": "string", "pattern": "^[0-9]{30}$"}
    st = _walk(JsonSchema(pat), tok, V, '"' + "1" * 25)
    assert _allows(st, tok, "1") and st.error is None
    # the guard's state forks with the matcher (beam search)
    st = _walk(JsonSchema(s), tok, V, '{"s": "' + "a" * 24)
    assert not _allows(st.fork(), tok, "a")


def test_repetition_bound_in_generation(blm):
    """A model forced towards one repeated character cannot write it more than max_same_char times in a row."""
    import re

    tok = blm.tokenizer
    a = tok.encode("a")[0]

    class PreferA:  # a logits processor that pushes "a" hard (as a looping model would)
        def start(self, prompt, tokenizer, vocab_size):
            return self

        def process(self, seq, scores):
            scores[..., a] += 1000.0
            return scores

        def advance(self, token):
            pass

        def fork(self):
            return self

    s = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 40}}, "required": ["s"],
         "additionalProperties": False}
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"num_beams": 2}):
        r = blm.generate('x', constraint=JsonSchema(s, runs=RunLimits(max_same_char=7)), processors=[PreferA()],
                         max_new_tokens=120, **kw)
        runs = [len(m.group(0)) for m in re.finditer(r"a+", r.text)]
        assert runs and max(runs) == 7, (kw, r.text)
        assert r.finish_reason == "stop" and len(json.loads(r.text)["s"]) == 40, (kw, r.text)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_run_limits_are_checked(bad):
    with pytest.raises(AigcError) as e:
        RunLimits(max_digits=bad)
    assert e.value.param == "max_digits"
