"""Fixtures of the tuner tests: the tiny random Llama with a chat template, and small JSONL files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tuneutil import words, write_jsonl

# a ChatML-like template in the tiny word-level vocabulary ("w3" opens a turn, "w4" ends it, eos is w2)
TEMPLATE = ("{% for m in messages %}w3 {{ m['role'] }} {{ m['content'] }} w4 {% endfor %}"
            "{% if add_generation_prompt %}w3 assistant {% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return d


@pytest.fixture
def sft_file(tmp_path) -> Path:
    """Chats whose answer is a fixed function of the question (learnable), plus a few text rows."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(24):
        q = [rng.randint(10, 40) for _ in range(3)]
        a = " ".join(f"w{x + 40}" for x in q)
        rows.append({"messages": [{"role": "user", "content": " ".join(f"w{x}" for x in q)},
                                  {"role": "assistant", "content": a}]})
    rows += [{"text": words(rng, 8)} for _ in range(4)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)
