"""Quality guard for quantisation (weight-only int8/int4, and w8a8) on the real SmolLM2: perplexity close to fp32; greedy still sane."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

TEXTS = [
    "The printing press was invented in the fifteenth century. It made books cheaper and spread literacy across "
    "Europe, changing religion, science and politics in ways that its inventor could not have imagined.",
    "To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves for each cup, pour the water "
    "and let it steep for three to five minutes before serving with milk or lemon.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and, using "
    "sunlight, produce glucose and release oxygen into the atmosphere.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "The river rises in the mountains, flows east through farmland and two large cities, and reaches the sea in a "
    "wide delta where fishermen, birds and ships share the shallow water.",
    "Dear customer, thank you for your order. Your package was shipped this morning and should arrive within three "
    "working days. Please contact us if anything is missing or damaged.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so "
    "water boils at a lower temperature and food takes longer to cook.",
    "She opened the old wooden box slowly. Inside, wrapped in faded blue paper, was a letter her grandmother had "
    "written sixty years earlier but never sent.",
]


@pytest.fixture(scope="module")
def ppl(smollm_gguf):
    from aigckit.text.lm import load_lm

    out = {}
    for mode in (None, "int8", "int4", "w8a8"):
        lm = load_lm(str(smollm_gguf), quantize=mode)
        scores = [lm.score(t) for t in TEXTS]
        total = sum(s.nll * s.n_tokens for s in scores) / sum(s.n_tokens for s in scores)
        out[mode] = (total, lm)
    return out


def test_int8_perplexity_within_1_percent(ppl):
    import math

    base, q = math.exp(ppl[None][0]), math.exp(ppl["int8"][0])
    assert abs(q / base - 1) <= 0.01, (base, q)


def test_w8a8_perplexity_within_1_percent(ppl):
    # with SmoothQuant's folds (without them: ~+4% on this set). A guard against quality lost: at most 1% above
    # float32. Below is not a loss: on an AVX2 machine this set measured -1.6% (21.16 vs 21.50), on an AVX-512 one
    # within +-1%; the folds are calibrated in float32 on the machine that quantises, and flipping a single
    # activation row by one step moved this 330-token set by ~0.5%. Far below (-5%) would point to a bug.
    import math

    base, q = math.exp(ppl[None][0]), math.exp(ppl["w8a8"][0])
    assert -0.05 <= q / base - 1 <= 0.01, (base, q)


def test_int4_perplexity_within_5_percent(ppl):
    import math

    base, q = math.exp(ppl[None][0]), math.exp(ppl["int4"][0])
    assert abs(q / base - 1) <= 0.05, (base, q)


def test_quantised_models_answer_sensibly(ppl):
    for mode in ("int8", "int4", "w8a8"):
        lm = ppl[mode][1]
        assert lm.run_config["quantize"] == mode
        res = lm.chat([{"role": "user", "content": "What is the capital of France? One word."}],
                      temperature=0, max_new_tokens=10)
        assert "Paris" in res.text, (mode, res.text)
