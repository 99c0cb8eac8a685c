"""The fused numba decode kernels against the PyTorch reference path of the same model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aigckit.text.config import LMConfig
from aigckit.text.kernels import attention, cpu, decode, onednn
from aigckit.text.kvcache import KVCache
from aigckit.text.model import Transformer

needs_kernels = pytest.mark.skipif(not decode.ENABLED, reason="numba kernels off")


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 64), (5, 37), (3, 7, 576)])
def test_rms_norm_matches_torch(shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    torch.testing.assert_close(decode.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5),
                               atol=1e-5, rtol=1e-5)


def _model(arch: str, n_kv_head: int) -> Transformer:
    cfg = LMConfig(arch=arch, vocab_size=50, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                   intermediate_size=48, block_size=64, bias=arch == "gpt2", tie_embeddings=arch == "gpt2")
    torch.manual_seed(1)
    m = Transformer(cfg)
    m.init_weights(std=0.2)
    return m.eval()


def _decode_run(model: Transformer, fused: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """Prefill a left-padded batch, then 6 decode steps in which the rows sit at different slots; returns the
    logits of every step and how many times the fused attention kernel ran."""
    calls = []
    real = decode.attend
    monkeypatch.setattr(decode, "ENABLED", fused)
    monkeypatch.setattr(decode, "attend", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(2)
    B, L = 3, 9
    cache = KVCache.for_model(model.config, B, 32)
    start = torch.tensor([0, 4, 2])  # rows 1 and 2 are left-padded
    tokens = torch.randint(0, 50, (B, L), generator=g)
    out = []
    with torch.inference_mode():
        out.append(model(tokens, torch.arange(L), cache, start=start)[:, -1])
        pos = torch.full((B, 1), L)
        pos[1] += 3  # per-row slots, as the continuous-batching scheduler uses them (rows advanced unevenly)
        for _ in range(6):
            nxt = torch.randint(0, 50, (B, 1), generator=g)
            out.append(model(nxt, pos, cache, start=start)[:, -1])
            pos = pos + 1
    return out, len(calls)


@needs_kernels
@pytest.mark.parametrize("arch,n_kv_head", [("llama", 2), ("llama", 4), ("llama", 1), ("gpt2", 4)])
def test_fused_decode_equals_reference_path(arch, n_kv_head, monkeypatch):
    model = _model(arch, n_kv_head)
    ref, ref_calls = _decode_run(model, False, monkeypatch)
    got, got_calls = _decode_run(model, True, monkeypatch)
    assert ref_calls == 0 and got_calls == 6 * model.config.n_layer  # every decode step, every layer
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_fused_path_not_taken_with_grad_or_bf16():
    model = _model("llama", 2)
    cache = KVCache.for_model(model.config, 1, 16)
    tok = torch.zeros(1, 1, dtype=torch.long)
    pos2d = torch.tensor([[3]])
    with torch.inference_mode():
        assert decode.prepare(model, tok, pos2d, None, cache, None) is not None
        bf16 = _model("llama", 2).to(torch.bfloat16)
        assert decode.prepare(bf16, tok, pos2d, None, cache, None) is None
        assert decode.prepare(model, tok, pos2d, None, KVCache.for_model(model.config, 1, 16, torch.bfloat16),
                              None) is None
        two = torch.zeros(1, 2, dtype=torch.long)
        assert decode.prepare(model, two, torch.tensor([[3, 4]]), None, cache, None) is None  # prefill
        assert decode.prepare(model, tok, pos2d, None, cache, torch.tensor([0])) is None  # explicit cache rows
        assert decode.prepare(model, tok, pos2d, torch.tensor([5]), cache, None) is None  # padding query
    with torch.enable_grad():
        assert decode.prepare(model, tok, pos2d, None, cache, None) is None


_W8A8_PATHS = {"w8a8": ("_w8a8_block_step", 16), "w8a8-onednn": ("_w8a8_onednn_block", 0)}


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8", "w8a8-onednn"])
@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_fused_quantised_block_equals_reference_path(mode, n_kv_head, monkeypatch):
    from aigckit.text import quant

    fn, fused_rows = _W8A8_PATHS.get(mode, ("_rows_block_step", 0))  # int4 shares the int8 block kernels
    if mode == "w8a8-onednn" and not cpu.onednn_u8s8_exact():
        pytest.skip("oneDNN's u8 x s8 product is not exact on this CPU (no VNNI): never used here")
    mode = mode.split("-")[0]
    monkeypatch.setattr(decode, "W8A8_FUSED_ROWS", fused_rows)  # 3 rows: the numba products, or oneDNN's
    model = _model("llama", n_kv_head)
    quant.quantize_model(model, mode)
    assert all(decode.fused_block_kind(b) == mode for b in model.blocks)
    calls = []
    real = getattr(decode, fn)
    monkeypatch.setattr(decode, fn, lambda *a: calls.append(1) or real(*a))
    ref, _ = _decode_run(model, False, monkeypatch)
    assert not calls
    got, _ = _decode_run(model, True, monkeypatch)
    assert len(calls) == 6 * model.config.n_layer
    # w8a8: the reference normalises with torch, the fused step with numba; a 1-ulp difference can move an
    # activation across an int8 rounding boundary (one quantisation step, ~1e-2 here; most steps are bit-equal)
    tol = 5e-2 if mode == "w8a8" else 1e-4
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=tol, rtol=1e-4)


@needs_kernels
def test_w8a8_fused_steps_on_packed_pairs_are_batch_invariant(monkeypatch):
    """Five rows decoded together (the packed-pairs products inside the fused blocks) give each row exactly the
    logits it gets decoded alone (one weight row at a time): both sums are exact, the rest is per row."""
    from aigckit.text import quant

    monkeypatch.setattr(decode, "W8A8_FUSED_ROWS", 16)  # fused numba blocks for 5 rows on every CPU
    model = _model("llama", 2)
    quant.quantize_model(model, "w8a8")
    g = torch.Generator().manual_seed(3)
    tokens, steps = torch.randint(0, 50, (5, 4), generator=g), torch.randint(0, 50, (5, 3, 1), generator=g)
    calls = []
    real = decode._w8a8_block_step
    monkeypatch.setattr(decode, "_w8a8_block_step", lambda *a: calls.append(a[3].B) or real(*a))

    def run(rows: slice) -> list[torch.Tensor]:
        cache = KVCache.for_model(model.config, rows.stop - rows.start, 16)
        with torch.inference_mode():
            model(tokens[rows], torch.arange(4), cache)
            return [model(steps[rows, i], torch.tensor([4 + i]), cache)[:, -1] for i in range(3)]

    together = run(slice(0, 5))
    assert set(calls) == {5}
    for r in range(5):
        alone = run(slice(r, r + 1))
        for a, b in zip(together, alone):
            assert torch.equal(a[r:r + 1], b)
    assert set(calls) == {5, 1}


def test_fused_block_kind_only_for_llama_blocks_of_one_format():
    from aigckit.text import quant

    llama, gpt2 = _model("llama", 2), _model("gpt2", 4)
    assert decode.fused_block_kind(llama.blocks[0]) != "int8"  # float32 linears
    quant.quantize_model(gpt2, "int8")
    assert decode.fused_block_kind(gpt2.blocks[0]) != "int8"  # LayerNorm / GELU block
    quant.quantize_model(llama, "w8a8", skip=lambda name, _: name.endswith("qkv"))
    assert decode.fused_block_kind(llama.blocks[0]) is None  # mixed modes: the per-op path
    quant.quantize_model(llama, "int8")
    assert decode.fused_block_kind(llama.blocks[0]) is None
    assert decode.fused_block_kind(gpt2.blocks[0]) is None


@needs_kernels
def test_fused_float32_block_at_batch_1_equals_reference_path(monkeypatch):
    model = _model("llama", 2)
    if not onednn.use_onednn(model):
        pytest.skip("oneDNN unavailable")
    assert all(decode.fused_block_kind(b) == "f32" for b in model.blocks)
    calls = []
    real = decode._rows_block_step
    monkeypatch.setattr(decode, "_rows_block_step", lambda *a: calls.append(1) or real(*a))

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(decode, "ENABLED", fused)
        cache = KVCache.for_model(model.config, 1, 32)
        g = torch.Generator().manual_seed(3)
        out = []
        with torch.inference_mode():
            out.append(model(torch.randint(0, 50, (1, 7), generator=g), torch.arange(7), cache)[:, -1])
            for p in range(7, 12):
                out.append(model(torch.randint(0, 50, (1, 1), generator=g), torch.tensor([p]), cache)[:, -1])
        return out

    ref = run(False)
    assert not calls
    got = run(True)
    assert len(calls) == 5 * model.config.n_layer
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_fused_float32_block_on_a_ragged_batch_equals_reference_path(monkeypatch):
    """Several rows (beam search, batched serving): the float32 block kernel reads the weight rows in place."""
    model = _model("llama", 2)
    if not onednn.use_onednn(model):
        pytest.skip("oneDNN unavailable")
    calls = []
    real = decode._rows_block_step
    monkeypatch.setattr(decode, "_rows_block_step", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    ref, _ = _decode_run(model, False, monkeypatch)
    assert not calls
    got, _ = _decode_run(model, True, monkeypatch)
    assert calls == [3] * (6 * model.config.n_layer)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def _fused_model(n_layer: int, mode: str) -> Transformer:
    from aigckit.text import quant

    cfg = LMConfig(arch="llama", vocab_size=50, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
                   intermediate_size=48, block_size=64)
    torch.manual_seed(1)
    m = Transformer(cfg)
    m.init_weights(std=0.2)
    m.eval()
    if mode == "f32":
        if not onednn.use_onednn(m):
            pytest.skip("oneDNN unavailable")
    else:
        quant.quantize_model(m, mode)
    return m


_NUMPY_ALLOCATORS = {"empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "array",
                     "ascontiguousarray", "copy", "astype", "concatenate", "stack"}


def _step_allocations(model: Transformer, rows: int) -> tuple[int, int]:
    """Allocations of one decode step after a few warm-up steps: (torch tensors, numpy arrays made from Python).
    (The numba kernels themselves allocate nothing: their scratch is passed in.)"""
    import sys

    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    cache = KVCache.for_model(model.config, rows, 32)
    tok = torch.randint(0, 50, (rows, 1), generator=torch.Generator().manual_seed(0))
    numpy_calls = []

    def watch(frame, event, fn):
        if event == "c_call" and fn.__name__ in _NUMPY_ALLOCATORS and (
                getattr(fn, "__module__", None) == "numpy" or isinstance(getattr(fn, "__self__", None), np.ndarray)):
            numpy_calls.append(fn.__name__)

    with torch.inference_mode():
        model(torch.randint(0, 50, (rows, 5)), torch.arange(5), cache)
        for p in range(5, 8):
            model(tok, torch.tensor([p]), cache)
        p8 = torch.tensor([8])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(tok, p8, cache)
        sys.setprofile(watch)
        try:
            model(tok, torch.tensor([9]), cache)
        finally:
            sys.setprofile(None)
    n_torch = sum(1 for e in prof.events() if e.self_cpu_memory_usage > 0)
    return n_torch, len(numpy_calls)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("mode", ["f32", "int8", "int4", "w8a8"])
def test_fused_decode_step_allocates_nothing_per_layer(mode, rows):
    """The fused blocks take every intermediate from the per-thread workspace: a decode step of a 4-layer model
    allocates exactly as much as one of a 2-layer model, and with weight-only, float32 or numba-w8a8 linears that
    is one array, the logits it returns. With oneDNN's w8a8 products (more rows, VNNI CPUs) its four integer
    products per layer are oneDNN's own outputs (and the output layer quantises its input: a few small arrays)."""
    shallow = _step_allocations(_fused_model(2, mode), rows)
    deep = _step_allocations(_fused_model(4, mode), rows)
    if mode == "w8a8" and rows > decode.W8A8_FUSED_ROWS and cpu.onednn_u8s8_exact():
        assert deep[0] - shallow[0] == 2 * 4 and deep[1] == shallow[1] <= 4
    elif mode == "w8a8":  # the blocks allocate nothing; the w8a8 output layer quantises its input (a few arrays)
        assert shallow == deep and shallow[0] == 0 and shallow[1] <= 4
    else:
        assert shallow == deep == (0, 1)  # (torch tensors, numpy arrays): the logits only


@needs_kernels
def test_workspace_reuses_buffers_step_after_step():
    model = _fused_model(2, "int8")
    cache = KVCache.for_model(model.config, 4, 32)
    with torch.inference_mode():
        model(torch.randint(0, 50, (4, 5)), torch.arange(5), cache)
        model(torch.zeros(4, 1, dtype=torch.long), torch.tensor([5]), cache)
        ws = decode.workspace(model)
        n = ws.allocations
        assert n > 0
        for p in range(6, 12):  # same or fewer rows: views of the same buffers
            model(torch.zeros(4 - p % 3, 1, dtype=torch.long), torch.tensor([p]), cache)
        assert ws.allocations == n
    import threading

    seen = []
    t = threading.Thread(target=lambda: seen.append(decode.workspace(model)))
    t.start()
    t.join()
    assert seen[0] is not ws  # another thread gets its own scratch


@needs_kernels
def test_vectorised_softmax_exp_matches_numpy():
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-90, 0, 997), [0.0, -1e-7, -0.5, -87.0, -104.0, -200.0, -1e30]]).astype(np.float32)
    mx = np.float32(0.0)
    got = x.copy()
    tot = attention._exp_shifted(got, len(x), mx, np.empty(len(x), dtype=np.int32))
    want = np.exp(x.astype(np.float64) - mx)
    big = want > 1e-30
    np.testing.assert_allclose(got[big], want[big], rtol=3e-7)
    assert np.all(got[~big] < 1e-30) and np.all(got >= 0)
    assert abs(tot - want.sum()) <= 1e-6 * want.sum()


@needs_kernels
@pytest.mark.parametrize("mode", ["f32", "int8", "int4", "w8a8"])
def test_concurrent_decoding_threads_do_not_share_scratch(mode):
    """Two threads decoding with one model at the same time (the server does this) get what each gets alone."""
    import threading

    model = _fused_model(2, mode)

    def run(seed: int, rows: int, out: list) -> None:
        g = torch.Generator().manual_seed(seed)
        cache = KVCache.for_model(model.config, rows, 40)
        with torch.inference_mode():
            model(torch.randint(0, 50, (rows, 6), generator=g), torch.arange(6), cache)
            for p in range(6, 30):
                out.append(model(torch.randint(0, 50, (rows, 1), generator=g), torch.tensor([p]), cache)[:, -1].clone())

    alone_a, alone_b = [], []
    run(1, 1, alone_a)
    run(2, 3, alone_b)
    together_a, together_b = [], []
    start = threading.Barrier(2)
    threads = [threading.Thread(target=lambda o=o, s=s, r=r: (start.wait(), run(s, r, o)))
               for o, s, r in ((together_a, 1, 1), (together_b, 2, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in ((alone_a, together_a), (alone_b, together_b)):
        assert len(got) == len(want)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
