"""load_lm(quantize=...): recorded in the run config, cached in the store, same outputs from the cache."""

from __future__ import annotations

import pytest
import torch

from aigckit.text import quant
from aigckit.text.lm import load_lm


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_load_is_cached_and_identical(mode, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    first = load_lm(str(tiny_llama_dir), quantize=mode)
    assert first.run_config["quantize"] == mode
    kinds = {type(m).__name__ for m in first.model.modules()}
    assert ("Int4Linear" in kinds) == (mode == "int4") and "Int8Linear" in kinds and "Linear" not in kinds
    assert list(tmp_path.glob(f"cache/*-{mode}-*/model.safetensors"))

    def boom(*a, **k):
        raise AssertionError("quantised again although the cache exists")

    monkeypatch.setattr(quant, "quantize_model", boom)
    second = load_lm(str(tiny_llama_dir), quantize=mode)
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(second.model(tokens), first.model(tokens))
    assert second.generate([5, 6, 7], temperature=0, max_new_tokens=8).token_ids == \
        first.generate([5, 6, 7], temperature=0, max_new_tokens=8).token_ids


def test_quantised_logits_close_to_float(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    ref = load_lm(str(tiny_llama_dir))
    q8 = load_lm(str(tiny_llama_dir), quantize="int8")
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = ref.model(tokens), q8.model(tokens)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
