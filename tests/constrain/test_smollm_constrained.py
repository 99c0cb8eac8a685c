"""SmolLM2-135M-Instruct (the real model) under JSON-Schema constraints: every output parses and validates
(the full 50 prompts x 3 schemas comparison is bench/constrain_json.py quality)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[2] / "bench" / "constrain_json.py"


def test_smollm_json_schemas_always_valid(smollm_gguf):
    spec = importlib.util.spec_from_file_location("constrain_json", BENCH)  # a script, not a package: load it
    cj = importlib.util.module_from_spec(spec)                               # by path
    spec.loader.exec_module(cj)
    from aigckit.constrain import JsonSchema
    from aigckit.text.lm import load_lm

    lm = load_lm(str(smollm_gguf))
    for name, schema in cj.SCHEMAS.items():
        prompts = [lm.chat_prompt([{"role": "user", "content": cj.ASK[name].format(x=s)}]) for s in cj.SUBJECTS[:2]]
        for r in lm.generate_batch(prompts, temperature=0, max_new_tokens=120, constraint=JsonSchema(schema)):
            assert r.finish_reason == "stop" and cj.valid(r.text, schema), (name, r.text)
