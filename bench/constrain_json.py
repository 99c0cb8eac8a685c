"""Structured output on a real model: the share of valid JSON with and without a JSON-Schema constraint, and the
constraint's cost per token.

    .venv/bin/python bench/constrain_json.py quality [--model smollm2-135m-instruct] [--prompts 50]
    .venv/bin/python bench/constrain_json.py overhead [--rows 1 16] [--tokens 64]

``quality``: N chat prompts x 3 schemas (flat, nested, enum + array), greedy, one static batch per schema and mode.
Unconstrained, the schema's fields are described in the prompt; an output counts as valid when the whole text
(stripped) parses as JSON and validates with ``jsonschema`` ("lenient": the first ``{...}`` in the text does).
Constrained, the same prompts with ``JsonSchema(schema)``; every output that ends ("stop") is valid by
construction, and the table says how many hit the token budget ("length") instead.

``overhead``: the time inside the constraint (mask + advance, measured around the processor) as a share of the
decode time, at ``--rows`` concurrent rows, for the nested schema, and the cold compile of a schema (first
request) against a cached one.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jsonschema

from aigckit.constrain import JsonSchema
from aigckit.constrain import matcher
from aigckit.text.lm import load_lm

S = {"type": "string", "minLength": 1, "maxLength": 40}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                              "city": S}, "required": ["name", "age", "city"],
             "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 120}},
                   "required": ["name", "age"], "additionalProperties": False},
        "address": {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"],
                    "additionalProperties": False}},
        "required": ["person", "address"], "additionalProperties": False},
    "enum_array": {"type": "object", "properties": {
        "title": S, "genre": {"enum": ["comedy", "drama", "horror", "sci-fi", "documentary"]},
        "tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 4},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["title", "genre", "tags", "rating"], "additionalProperties": False},
}
ASK = {
    "flat": "Describe {x} as a JSON object with the keys name (string), age (integer) and city (string). "
            "Answer with the JSON only.",
    "nested": "Describe {x} as a JSON object with the keys person (an object with name and age) and address (an "
              "object with city and country). Answer with the JSON only.",
    "enum_array": "Describe a film about {x} as a JSON object with the keys title (string), genre (one of comedy, "
                  "drama, horror, sci-fi, documentary), tags (a list of strings) and rating (integer 1-5). Answer "
                  "with the JSON only.",
}
SUBJECTS = ["a baker in Paris", "a retired pilot", "a young chess player", "a marine biologist", "a farmer in Kenya",
            "a jazz musician", "a software engineer in Tokyo", "a school teacher", "a firefighter", "a painter",
            "an astronaut", "a librarian in Oslo", "a taxi driver", "a nurse in Lima", "a carpenter", "a poet",
            "a football coach", "a chemist", "a bus driver in Rome", "a violinist", "a gardener", "a detective",
            "a tailor in Cairo", "a sailor", "a mountain guide", "a barista", "a surgeon", "a photographer",
            "a beekeeper", "an architect in Berlin", "a fisherman", "a game designer", "a zookeeper", "a judge",
            "a potter", "a translator", "a mechanic in Detroit", "a dancer", "a geologist", "a pharmacist",
            "a shepherd", "a news anchor", "a blacksmith", "a park ranger", "a lighthouse keeper", "a cartographer",
            "a pastry chef in Vienna", "a radio host", "a glassblower", "a tea farmer"]


def valid(text: str, schema: dict, lenient: bool = False) -> bool:
    if lenient:
        m = re.search(r"\{.*\}", text, re.S)
        text = m.group(0) if m else text
    try:
        jsonschema.validate(json.loads(text.strip()), schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def quality(args) -> None:
    lm = load_lm(args.model, threads=args.threads)
    rows = []
    for name, schema in SCHEMAS.items():
        prompts = [lm.chat_prompt([{"role": "user", "content": ASK[name].format(x=s)}])
                   for s in SUBJECTS[:args.prompts]]
        free = lm.generate_batch(prompts, temperature=0, max_new_tokens=args.max_new_tokens)
        t0 = time.perf_counter()
        cons = lm.generate_batch(prompts, temperature=0, max_new_tokens=args.max_new_tokens,
                                 constraint=JsonSchema(schema))
        dt = time.perf_counter() - t0
        rows.append({
            "schema": name, "n": len(prompts),
            "free_valid": sum(valid(r.text, schema) for r in free),
            "free_valid_lenient": sum(valid(r.text, schema, True) for r in free),
            "constrained_valid": sum(valid(r.text, schema) for r in cons),
            "constrained_stop": sum(r.finish_reason == "stop" for r in cons),
            "constrained_length": sum(r.finish_reason == "length" for r in cons),
            "constrained_s": round(dt, 1),
            "example_free": free[0].text[:160], "example_constrained": cons[0].text[:160]})
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    print("\n| schema | prompts | valid without constraint (strict / first {...}) | valid with constraint | "
          "stopped / cut by budget |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schema']} | {r['n']} | {r['free_valid']} / {r['free_valid_lenient']} | "
              f"{r['constrained_valid']} | {r['constrained_stop']} / {r['constrained_length']} |")


class Timed:
    """Wraps a constraint: the same masks, with the seconds spent in process/advance/start added up."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, [0.0]

    def start(self, prompt, tokenizer, vocab_size):
        t = time.perf_counter()
        st = _TimedState(self.inner.start(prompt, tokenizer, vocab_size), self.seconds)
        self.seconds[0] += time.perf_counter() - t
        return st


class _TimedState:
    def __init__(self, st, acc) -> None:
        self.st, self.acc = st, acc

    def process(self, seq, scores):
        t = time.perf_counter()
        out = self.st.process(seq, scores)
        self.acc[0] += time.perf_counter() - t
        return out

    def advance(self, tok):
        t = time.perf_counter()
        self.st.advance(tok)
        self.acc[0] += time.perf_counter() - t

    def fork(self):
        return _TimedState(self.st.fork(), self.acc)


def overhead(args) -> None:
    lm = load_lm(args.model, threads=args.threads)
    schema = SCHEMAS["nested"]
    # first constrained request on this tokenizer (builds llguidance's tokenizer), then a new schema (compile),
    # then the same schema again (cached)
    t = time.perf_counter()
    JsonSchema({"type": "object"}).start([1], lm.tokenizer, lm.config.vocab_size)
    t_tok = time.perf_counter() - t
    cold = dict(schema, description=f"cold-{time.time()}")
    t = time.perf_counter()
    JsonSchema(cold).start([1], lm.tokenizer, lm.config.vocab_size)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    JsonSchema(cold).start([1], lm.tokenizer, lm.config.vocab_size)
    t_hot = time.perf_counter() - t
    print(json.dumps({"first_on_tokenizer_ms": round(t_tok * 1e3, 1), "new_schema_ms": round(t_cold * 1e3, 2), "cached_start_ms": round(t_hot * 1e3, 3),
                      "cache": matcher.cache_info()}))
    for rows in args.rows:
        prompts = [lm.chat_prompt([{"role": "user", "content": ASK["nested"].format(x=s)}])
                   for s in SUBJECTS[:rows]]
        best = None
        for _ in range(args.repeats):
            timed = Timed(JsonSchema(schema))
            res = lm.generate_batch(prompts, temperature=0, max_new_tokens=args.tokens, constraint=timed)
            # decode time of the whole batch = the slowest row's: every step decodes all rows
            dec = res[0].timings.get("decode_s") or 0.0
            steps = max(len(r.token_ids) for r in res)
            cur = (timed.seconds[0], dec, steps, sum(len(r.token_ids) for r in res))
            best = cur if best is None or cur[0] / max(cur[1], 1e-9) < best[0] / max(best[1], 1e-9) else best
        c, d, steps, toks = best
        print(json.dumps({"rows": rows, "steps": steps, "tokens": toks, "decode_s": round(d, 3),
                          "constraint_s": round(c, 4), "constraint_ms_per_row_token": round(c / toks * 1e3, 3),
                          "overhead_pct_of_decode": round(100 * c / max(d - c, 1e-9), 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quality", "overhead"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    quality(args) if args.what == "quality" else overhead(args)


if __name__ == "__main__":
    main()
