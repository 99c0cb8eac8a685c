import numpy as np
import pytest
import torch
from torch import nn

from aigckit.text import quant
from aigckit.text.kernels import ENABLED, gemm
from aigckit.text.quant import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    load_quantized,
    quantize_int4,
    quantize_int8,
    quantize_model,
    save_quantized,
)

# (in, out), odd sizes included: out < 4, out % 4 != 0 and out % 16 != 0 exercise the kernels' partial tiles
SHAPES = [(64, 32), (37, 5), (100, 33), (33, 64), (576, 192), (19, 3), (96, 18)]
ROWS = [1, 2, 3, 4, 5, 8, 16, 17, 40]
needs_numba = pytest.mark.skipif(not ENABLED, reason="numba kernels off")


def _linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


def _reference(mod, x: torch.Tensor) -> torch.Tensor:
    w = mod.dequantize().double()
    y = x.double() @ w.T
    if mod.bias is not None:
        y = y + mod.bias.double()
    return y


def _make(kind: str, lin: nn.Linear, group_size: int = 32):
    return Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, group_size)


# ------------------------------------------------------------------------------------------ quantisers


def test_int8_error_bound_per_row():
    torch.manual_seed(1)
    w = torch.randn(17, 45) * torch.rand(17, 1) * 3
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (17,)
    assert q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs().amax(dim=1)
    assert torch.all(err <= s / 2 + 1e-6)
    assert torch.all(q[3] == 0) and s[3] == 0


@pytest.mark.parametrize("in_f,group_size", [(64, 32), (45, 32), (45, 8), (7, 4), (30, 32)])
def test_int4_error_bound_and_padding(in_f, group_size):
    torch.manual_seed(2)
    w = torch.randn(9, in_f)
    qw, scales, mins = quantize_int4(w, group_size)
    ngroups = -(-in_f // group_size)
    assert qw.dtype == torch.uint8 and qw.shape == (9, ngroups * group_size // 2)
    assert scales.shape == mins.shape == (9, ngroups)
    deq = dequantize_int4(qw, scales, mins, in_f)
    assert deq.shape == w.shape
    # each element is within half a step of its group's scale
    per_elem_scale = scales.repeat_interleave(group_size, dim=1)[:, :in_f]
    assert torch.all((deq - w).abs() <= per_elem_scale / 2 + 1e-5)
    # min/max of each (padded) group are exact to rounding: padding did not widen the range
    gmax = torch.stack([w[:, g * group_size:(g + 1) * group_size].amax(1) for g in range(ngroups)], 1)
    torch.testing.assert_close(mins + 15 * scales, gmax, atol=1e-5, rtol=1e-5)


def test_int4_packing_is_q4_1_layout():
    # byte j of a group holds element j (low nibble) and element j + G/2 (high nibble)
    w = torch.arange(32, dtype=torch.float32).repeat(2, 1) % 16  # q == value when min=0, max=15
    w[:, 0] = 0.0
    w[:, 31] = 15.0
    qw, scales, mins = quantize_int4(w, 32)
    assert torch.allclose(scales, torch.ones_like(scales)) and torch.all(mins == 0)
    q = w.to(torch.uint8)
    assert torch.equal(qw, q[:, :16] | (q[:, 16:] << 4))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 8), 7)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(4))
    with pytest.raises(ValueError, match="quantize mode"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")
    with pytest.raises(ValueError, match="last dimension"):
        Int8Linear.from_linear(nn.Linear(4, 3))(torch.randn(2, 5))
    with pytest.raises(ValueError, match="threads"):
        gemm.set_num_threads(0)


# ------------------------------------------------------------------------------------------ kernels


@needs_numba
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_float_reference(kind, bias, shape):
    k, n = shape
    mod = _make(kind, _linear(k, n, bias))
    for m in ROWS:
        x = torch.randn(m, k)
        y = mod(x, use_kernel=True)
        assert y.shape == (m, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), _reference(mod, x), atol=2e-5, rtol=1e-4)
        # the dequantise + F.linear fallback gives the same result
        torch.testing.assert_close(mod(x, use_kernel=False), y, atol=2e-5, rtol=1e-4)


@needs_numba
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_kernel_sees_replaced_and_updated_buffers(kind):
    # the modules cache numpy views of their buffers: assigning new tensors (load_state_dict(assign=True)) and
    # updating in place (load_state_dict without assign) must both reach the kernel
    a, b = _make(kind, _linear(48, 20, True, seed=1)), _make(kind, _linear(48, 20, True, seed=2))
    x = torch.randn(3, 48)
    ya = a(x, use_kernel=True)
    a.load_state_dict(b.state_dict(), assign=True)
    torch.testing.assert_close(a(x, use_kernel=True), b(x, use_kernel=True))
    c = _make(kind, _linear(48, 20, True, seed=1))
    a.load_state_dict(c.state_dict())  # copies into the current tensors
    torch.testing.assert_close(a(x, use_kernel=True), ya)


@needs_numba
def test_kernels_compiled_once_with_slp_and_frozen():
    import numba

    before = numba.config.SLP_VECTORIZE
    mod = _make("int4", _linear(64, 8, False))
    mod(torch.randn(2, 64), use_kernel=True)
    assert numba.config.SLP_VECTORIZE == before  # the switch is restored after compiling
    assert len(gemm._int4_kernel.signatures) == 1 and not gemm._int4_kernel._can_compile


@needs_numba
def test_kernel_zero_rows():
    mod = _make("int8", _linear(16, 4, True))
    assert mod(torch.randn(0, 16), use_kernel=True).shape == (0, 4)
    assert mod(torch.randn(2, 0, 16)).shape == (2, 0, 4)


@needs_numba
@pytest.mark.parametrize("group_size", [8, 16, 64])
def test_int4_other_group_sizes(group_size):
    mod = Int4Linear.from_linear(_linear(75, 21, True), group_size)
    x = torch.randn(5, 75)
    torch.testing.assert_close(mod(x, use_kernel=True).double(), _reference(mod, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_leading_dims_noncontiguous_bf16(kind):
    mod = _make(kind, _linear(40, 24, True))
    x = torch.randn(2, 40, 3).transpose(1, 2)  # [2, 3, 40], not contiguous
    y = mod(x)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.double(), _reference(mod, x.reshape(-1, 40)).view(2, 3, 24), atol=2e-5, rtol=1e-4)
    yb = mod(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 24)
    torch.testing.assert_close(yb.float(), mod(x.to(torch.bfloat16).float()), atol=2e-2, rtol=2e-2)


def test_auto_path_selection_threshold(monkeypatch):
    mod = Int8Linear.from_linear(_linear(32, 8, True))
    calls = []
    monkeypatch.setattr(Int8Linear, "_run_kernel", lambda self, xn, yn: calls.append(xn.shape[0]) or yn.fill(0))
    mod(torch.randn(quant.FALLBACK_MIN_ROWS, 32))
    big = len(calls)
    mod(torch.randn(1, 32))
    assert big == 0 and calls == ([1] if ENABLED else [])


# ------------------------------------------------------------------------------------------ whole models


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 40)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": nn.Linear(40, 40, bias=False), "mlp": nn.Linear(40, 72)}) for _ in range(2)
        )
        self.norm = nn.LayerNorm(40)
        self.lm_head = nn.Linear(40, 11, bias=False)

    def forward(self, tok):
        h = self.emb(tok)
        for b in self.blocks:
            h = h + b["attn"](h)
            h = h + b["mlp"](h)[..., :40]
        return self.lm_head(self.norm(h))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_replaces_exactly_unskipped_linears(mode):
    torch.manual_seed(0)
    model = _Tiny()
    tok = torch.randint(0, 11, (2, 5))
    ref = model(tok)
    out = quantize_model(model, mode, group_size=16, skip=lambda name, m: name == "lm_head")
    assert out is model
    cls = Int8Linear if mode == "int8" else Int4Linear
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, cls))}
    assert kinds == {
        "blocks.0.attn": cls, "blocks.0.mlp": cls, "blocks.1.attn": cls, "blocks.1.mlp": cls, "lm_head": nn.Linear,
    }
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.emb, nn.Embedding)
    assert model.blocks[0]["mlp"].bias is not None and model.blocks[0]["attn"].bias is None
    tol = 0.02 if mode == "int8" else 0.15
    assert (model(tok) - ref).abs().max() < tol * ref.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_safetensors_round_trip_identical(tmp_path, mode):
    torch.manual_seed(0)
    model = quantize_model(_Tiny(), mode, group_size=16)
    tok = torch.randint(0, 11, (3, 4))
    want = model(tok)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]  # no temporary file left
    with torch.device("meta"):
        fresh = _Tiny()
    load_quantized(fresh, path)
    assert {n for n, m in fresh.named_modules() if isinstance(m, (Int8Linear, Int4Linear))} == {
        "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "lm_head",
    }
    assert torch.equal(fresh(tok), want)


def test_load_without_metadata_raises(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        load_quantized(_Tiny(), tmp_path / "plain.safetensors")


# ------------------------------------------------------------------------------------------ w8a8 and float32


def _w8a8_reference(mod: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    # integer arithmetic written out: per-row int8 activations, int8 weights, exact products, then the scales
    amax = x.abs().amax(dim=1, keepdim=True)
    s = amax / 127.0
    xq = torch.round(x * quant.act_inv_scale(amax)).clamp(-127, 127)
    acc = xq.double() @ mod.qweight.double().T
    y = acc * s.double() * mod.scale.double()
    return y + mod.bias.double() if mod.bias is not None else y


@needs_numba
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_w8a8_kernel_matches_integer_reference_and_is_batch_invariant(bias, shape):
    k, n = shape
    mod = Int8Linear.from_linear(_linear(k, n, bias), act_quant=True)
    for m in ROWS:
        x = torch.randn(m, k)
        x[0, 0] = 0.0
        y = mod(x)
        assert y.shape == (m, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), _w8a8_reference(mod, x), atol=1e-5, rtol=1e-5)
        # each row's result is the same whatever else is in the batch (exact integer accumulation)
        assert torch.equal(torch.cat([mod(x[i:i + 1]) for i in range(m)]), y)
        # the reference path (no numba kernels) computes the same bits
        assert torch.equal(mod(x, use_kernel=False), y)
        # and so does the differentiable fake-quantised path, up to float rounding
        xg = x.clone().requires_grad_(True)
        torch.testing.assert_close(mod(xg).detach(), y, atol=1e-4, rtol=1e-4)
    assert torch.equal(mod(torch.zeros(2, k)), (mod.bias if bias else torch.zeros(n)).expand(2, n))


def _f32_bits(*bits: int) -> np.ndarray:
    return np.array(bits, np.uint32).view(np.float32)


@needs_numba
def test_w8a8_activations_round_alike_in_kernel_and_reference():
    # Two real SmolLM2 activation rows (AVX2 CPU) on which the two paths disagreed, each by one step on a value near
    # a half: (1) PyTorch's 127.0 / amax is reciprocal-then-multiply, one ulp below the correctly rounded division,
    # so 11.5 became 11.499999 (-> 11) in the reference; (2) the kernel, compiled with 'reassoc', computed
    # (x * 127) / amax, so -11.499999 became -11.5 (-> -12). Both: a whole row of a layer one step apart, and
    # perplexity 0.6% apart between the paths. Now 127 / amax is one division and x * inv one rounded product.
    cases = [(_f32_bits(0x3F99B053)[0], _f32_bits(0x3DDEAACD)[0], 12),
             (_f32_bits(0x3FB30143)[0], _f32_bits(0xBE01AC40)[0], -11)]
    row = np.zeros((4, 64), np.float32)
    for i, (amax, v, _) in enumerate(cases):
        row[2 * i, 0], row[2 * i, 1:] = amax, v
        row[2 * i + 1] = -row[2 * i]
    xq, xs = np.empty(row.shape, np.int8), np.empty(4, np.float32)
    gemm.quantize_rows(row, xq, xs)
    assert [xq[0, 1], xq[1, 1], xq[2, 1], xq[3, 1]] == [12, -12, -11, 11]
    mod = Int8Linear.from_linear(_linear(64, 8, True), act_quant=True)
    x = torch.from_numpy(row)
    assert torch.equal(mod(x), mod(x, use_kernel=False))
    assert torch.equal(quant.fake_quant_act(x), torch.from_numpy(xq.astype(np.float32) * xs[:, None]))


def test_w8a8_differs_from_weight_only_by_activation_rounding():
    lin = _linear(64, 16, True)
    a, w = Int8Linear.from_linear(lin, act_quant=True), Int8Linear.from_linear(lin)
    x = torch.randn(4, 64)
    ya, yw = a(x), w(x)
    assert not torch.equal(ya, yw)  # activations really are quantised
    assert (ya - yw).abs().max() < 0.05 * yw.abs().max()
    assert "act_quant=True" in repr(a) and "act_quant" not in repr(w)


@pytest.mark.parametrize("mode", ["w8a8"])
def test_w8a8_model_round_trip_keeps_mode(tmp_path, mode):
    torch.manual_seed(0)
    model = quantize_model(_Tiny(), "w8a8", skip=lambda name, _: name == "lm_head")
    quantize_model(model, "int8")
    layout = quant.quant_layout(model)
    assert layout["blocks.0.attn"]["mode"] == "w8a8" and layout["lm_head"]["mode"] == "int8"
    tok = torch.randint(0, 11, (3, 4))
    want = model(tok)
    save_quantized(model, tmp_path / "q.safetensors")
    with torch.device("meta"):
        fresh = _Tiny()
    load_quantized(fresh, tmp_path / "q.safetensors")
    assert fresh.blocks[1]["mlp"].act_quant and not fresh.lm_head.act_quant
    assert torch.equal(fresh(tok), want)
