"""lm-evaluation-harness (`local-completions`) against `aigc serve` on a six-question multiple-choice task from
local files: every log-likelihood it computes from our echo + logprobs equals the one from `LM.score`."""

from __future__ import annotations

from pathlib import Path

import pytest

from serveutil import API_KEY

lm_eval = pytest.importorskip("lm_eval")
TASK_DIR = Path(__file__).parent / "lmeval"


@pytest.fixture(scope="module")
def server(tb_server):
    return tb_server


def _score_ll(lm, context: str, continuation: str) -> float:
    """log p(continuation | context) from two `score` calls (mean NLL x predicted tokens)."""
    a, b = lm.encode(context), lm.encode(context + continuation)
    whole, ctx = lm.score(b, window=len(b), stride=len(b)), lm.score(a, window=len(a), stride=len(a)) \
        if len(a) > 1 else None
    return -(whole.nll * whole.n_tokens - (ctx.nll * ctx.n_tokens if ctx else 0.0))


@pytest.mark.slow
def test_lm_eval_local_completions_matches_score(server, blm, tiny_bytes_dir, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yaml = (TASK_DIR / "tinymc.yaml").read_text().replace("tests/constrain/lmeval/tinymc.jsonl",
                                                           str(TASK_DIR / "tinymc.jsonl"))
    (tmp_path / "tinymc.yaml").write_text(yaml)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": server.url + "/v1/completions", "model": "tb", "tokenizer": str(tiny_bytes_dir),
                    "tokenizer_backend": "huggingface", "max_retries": 1, "num_concurrent": 1},
        tasks=["aigc_tinymc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    acc = out["results"]["aigc_tinymc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = out["samples"]["aigc_tinymc"]
    assert len(samples) == 6
    n = 0
    for s in samples:
        for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
            ll = resp[0][0]  # (log-likelihood, is_greedy) of this choice
            assert abs(ll - _score_ll(blm, ctx, cont)) < 1e-3, (ctx, cont)
            n += 1
    assert n == 18
