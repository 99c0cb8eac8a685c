"""A prefix of input embeddings (``forward(prefix=...)``, the engine's ``prefix``): feeding the token embeddings of a
prompt's first P tokens as the prefix must give exactly what the tokens give - logits, greedy and sampled text,
beam search - through every path that prefills (static batch, beam search)."""

from __future__ import annotations

import pytest
import torch

from aigckit.errors import AigcError
from aigckit.text.engine import generate
from aigckit.text.lm import load_lm
from aigckit.text.params import GenerationParams

PROMPTS = [[5, 17, 33, 9, 41, 7], [70, 3, 12, 8, 60, 2]]


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def lm(request):
    return load_lm(str(request.getfixturevalue(request.param)))


def _swap(lm, prompts, P, placeholder=0):
    """Prompts whose first P tokens become placeholders, and those tokens' embeddings as the prefix."""
    emb = torch.stack([lm.model.tok_emb(torch.tensor(p[:P])).detach() for p in prompts])
    return [[placeholder] * P + p[P:] for p in prompts], emb


@pytest.mark.parametrize("P", [1, 4, 6])
def test_forward_prefix_equals_tokens(lm, P):
    held, prefix = _swap(lm, PROMPTS, P)
    with torch.no_grad():
        want = lm.model(torch.tensor(PROMPTS))
        got = lm.model(torch.tensor(held), prefix=prefix)
        off = lm.model(torch.tensor(held))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(off, want)  # the placeholders alone give other logits: the prefix is what matters


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=0.9, seed=3), dict(num_beams=3),
                                dict(temperature=0, num_return_sequences=2)])
def test_generation_with_prefix_equals_prompt_tokens(lm, kw):
    held, prefix = _swap(lm, PROMPTS, 4)
    params = GenerationParams(max_new_tokens=10, ignore_eos=True, **kw)
    want = generate(lm.model, lm.tokenizer, PROMPTS, params)
    got = generate(lm.model, lm.tokenizer, held, params, prefix=prefix)
    for w, g in zip(want, got):
        assert [s.token_ids for s in g.sequences] == [s.token_ids for s in w.sequences]


def test_prefix_errors(lm):
    held, prefix = _swap(lm, PROMPTS, 4)
    params = GenerationParams(max_new_tokens=2, temperature=0)
    with pytest.raises(AigcError, match="same length"):
        generate(lm.model, lm.tokenizer, [held[0], held[1][:-1]], params, prefix=prefix)
    with pytest.raises(AigcError, match="one row per prompt"):
        generate(lm.model, lm.tokenizer, held, params, prefix=prefix[:1])
    with pytest.raises(ValueError, match="prefix must be"):
        lm.model(torch.tensor(held), prefix=prefix[:, :, :3])


def test_logits_from_is_a_slice_of_all_logits(lm):
    with torch.no_grad():
        full = lm.model(torch.tensor(PROMPTS))
        part = lm.model(torch.tensor(PROMPTS), logits_from=3)
    torch.testing.assert_close(part, full[:, 3:], rtol=0, atol=1e-6)
