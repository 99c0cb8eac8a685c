"""Loading a model builds it on the meta device and assigns the file's tensors; nothing in that build may run
torch's Python reference kernels (a meta ``normal_`` or ``arange``), whose first use imports torch._dynamo: that import
was 2 of the 3 seconds of loading SmolLM2."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
from aigckit.text.lm import load_lm
lm = load_lm(sys.argv[1])
lm.generate([3, 4], max_new_tokens=2, temperature=0)
assert "torch._dynamo" not in sys.modules, "loading imported torch._dynamo"
"""


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_loading_a_model_does_not_import_dynamo(fixture, request):
    path = request.getfixturevalue(fixture)
    r = subprocess.run([sys.executable, "-c", CHECK, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_embedding_draws_like_torch_off_meta():
    import torch
    from torch import nn

    from aigckit.layers import embedding

    torch.manual_seed(0)
    ours = embedding(7, 5)
    torch.manual_seed(0)
    theirs = nn.Embedding(7, 5)
    assert torch.equal(ours.weight, theirs.weight) and ours.weight.requires_grad
    with torch.device("meta"):
        assert embedding(7, 5).weight.device.type == "meta"
