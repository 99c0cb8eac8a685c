"""The watermark on the real SmolLM2 (fixed seeds, no timing): 200 marked tokens are detected at FPR 1e-3 from the
decoded text (scored at the entropy gate with the model, as ``aigc detect`` does, and without the model), the same
prompts unmarked are not, and beam search carries the mark too."""

from __future__ import annotations

import pytest

from aigckit.text.lm import load_lm
from aigckit.trust.detect import detect_text
from aigckit.trust.watermark import Watermark

pytestmark = pytest.mark.integration

PROMPTS = ["Write a short essay about the history of bridges.", "Tell a story about a lighthouse keeper."]


@pytest.mark.slow
def test_smollm_watermark_detected_at_fpr_1e3(smollm_gguf):
    lm = load_lm(str(smollm_gguf))
    wm = Watermark("integration-key")  # the defaults: gamma 0.5, delta 2, entropy gate
    ids = [lm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    kw = dict(max_new_tokens=200, temperature=1.0, seed=0, ignore_eos=True)
    marked = lm.generate_batch(ids, watermark=wm, **kw)
    plain = lm.generate_batch(ids, **kw)
    for m, p in zip(marked, plain):
        text = lm.tokenizer.decode(m.token_ids, skip_special_tokens=True)
        gated = detect_text(text, wm, lm.tokenizer, lm=lm)
        assert gated.watermarked and gated.p_value <= 1e-3, gated
        every = detect_text(text, wm, lm.tokenizer)  # every token scored: fewer marked ones among them
        assert every.n_scored > gated.n_scored and every.p_value <= 1e-2, every
        for kw0 in ({"lm": lm}, {}):
            d0 = detect_text(lm.tokenizer.decode(p.token_ids, skip_special_tokens=True), wm, lm.tokenizer, **kw0)
            assert not d0.watermarked and d0.p_value > 1e-2, d0
    beam = lm.generate(ids[0], watermark=Watermark("integration-key", delta=4.0), num_beams=3, max_new_tokens=60,
                       ignore_eos=True)
    d = detect_text(beam.text, wm, lm.tokenizer, lm=lm)  # beams keep to confident steps: few reach the gate
    assert d.n_scored >= 10 and d.green_fraction > 0.65, d
    # the paper's scheme (gamma 0.25, every step marked) is detected too
    wm0 = Watermark("integration-key", gamma=0.25, min_entropy=0.0)
    m0 = lm.generate(ids[1], watermark=wm0, **kw)
    d = detect_text(lm.tokenizer.decode(m0.token_ids, skip_special_tokens=True), wm0, lm.tokenizer)
    assert d.p_value <= 1e-3, d
