"""Time the linear kernels (weight-only int8/int4, w8a8, float32 numba tile and oneDNN) against fp32 / bf16 F.linear on the 211 SmolLM2-135M matrices.

    .venv/bin/python bench/kernel_speed.py [--rows 1 5 16] [--repeats 7] [--threads N] [--blocks 30] [--baseline]

Each cell is the best of ``--repeats`` passes over all matrices (one pass = every linear once, like one decode
step, through the modules' forward, so Python overhead is included), all columns measured in the same process
with the same random weights; the columns are interleaved (one pass of each, repeated) so that load from other
processes on a shared machine hits them alike. Cap the ISA as the tests do (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=``) for another CPU class's numbers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from aigckit.text import quant
from aigckit.text.kernels import ENABLED, cpu, gemm, onednn


def smollm2_shapes(blocks: int = 30) -> list[tuple[int, int]]:
    """(in, out) of every linear: per block q, k, v, o, gate, up, down; then lm_head."""
    per_block = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    return per_block * blocks + [(576, 49152)]


def interleaved_best(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds; each round runs every function once."""
    for fn in fns.values():
        fn()  # warm-up (and numba compile / cache load)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 5, 16], help="M = batch*tokens values")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--no-dequant", action="store_true", help="skip the dequantise+BLAS columns")
    args = ap.parse_args()
    if args.threads:
        gemm.set_num_threads(args.threads)

    torch.manual_seed(0)
    shapes = smollm2_shapes(args.blocks)
    lins = []
    for k, n in shapes:
        lin = torch.nn.Linear(k, n, bias=False)
        torch.nn.init.normal_(lin.weight, std=0.02)
        lins.append(lin)
    w32 = [lin.weight.detach() for lin in lins]
    w16 = [w.to(torch.bfloat16) for w in w32]
    t = time.perf_counter()
    q8 = [quant.Int8Linear.from_linear(lin) for lin in lins]
    t_q8 = time.perf_counter() - t
    a8 = [quant.Int8Linear.from_linear(lin, act_quant=True) for lin in lins]
    packed = [w.to_mkldnn() for w in w32] if onednn.available() else None
    t = time.perf_counter()
    q4 = [quant.Int4Linear.from_linear(lin, args.group_size) for lin in lins]
    t_q4 = time.perf_counter() - t
    nparams = sum(k * n for k, n in shapes)
    print(f"{len(shapes)} matrices, {nparams / 1e6:.1f} M weights; torch threads {torch.get_num_threads()}, "
          f"numba kernels {ENABLED}; w8a8 oneDNN u8s8 exact here: {cpu.onednn_u8s8_exact()}")
    print(f"quantise all: int8 {t_q8:.2f} s, int4 {t_q4:.2f} s")

    # first call: numba compile or on-disk cache load
    x = torch.randn(1, 576)
    for name, mod in (("int8", q8[0]), ("int4", q4[0])):
        t = time.perf_counter()
        mod(x, use_kernel=True)
        print(f"first {name} kernel call (compile or cache load): {time.perf_counter() - t:.2f} s")

    cols = {
        "fp32 F.linear": lambda xs: [F.linear(xs[k], w) for k, w in zip(ins, w32)],
        "bf16 F.linear": lambda xs: [F.linear(xs16[k], w) for k, w in zip(ins, w16)],
        "int8 numba": lambda xs: [m(xs[k]) for k, m in zip(ins, q8)],
        "int4 numba": lambda xs: [m(xs[k]) for k, m in zip(ins, q4)],
        "w8a8 (module)": lambda xs: [m(xs[k]) for k, m in zip(ins, a8)],
        "w8a8 numba i8i8 only": lambda xs: [gemm.matmul_i8i8(xq[k], m.qweight.numpy(), m.scale.numpy(),
                                                             yw[k, m.out_features]) for k, m in zip(ins, a8)],
        "fp32 numba tile": lambda xs: [gemm.linear_f32(xs[k], w) for k, w in zip(ins, w32)],
    }
    if packed is not None:
        cols["fp32 oneDNN packed"] = lambda xs: [torch.ops.mkldnn._linear_pointwise(xs[k], p, None, "none", [], "")
                                                 for k, p in zip(ins, packed)]
    if not args.no_dequant:
        cols["int8 dequant+BLAS"] = lambda xs: [m(xs[k], use_kernel=False) for k, m in zip(ins, q8)]
        cols["int4 dequant+BLAS"] = lambda xs: [m(xs[k], use_kernel=False) for k, m in zip(ins, q4)]
    ins = [k for k, _ in shapes]
    header = f"{'ms per pass (211 linears)':<28}" + "".join(f"{f'M={m}':>10}" for m in args.rows)
    print(header)
    results: dict[str, list[float]] = {c: [] for c in cols}
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in set(ins)}
        xs16 = {k: v.to(torch.bfloat16) for k, v in xs.items()}
        xq = {k: np.random.default_rng(k).integers(-127, 128, (m, k), dtype=np.int8) for k in set(ins)}
        yw = {(k, n): np.empty((m, n), dtype=np.float32) for k, n in set(shapes)}
        best = interleaved_best({c: (lambda fn=fn: fn(xs)) for c, fn in cols.items()}, args.repeats)
        for c in cols:
            results[c].append(best[c] * 1e3)
    for c, vals in results.items():
        print(f"{c:<28}" + "".join(f"{v:>10.1f}" for v in vals))
    gb = {"fp32": 4 * nparams, "int8": nparams + 4 * sum(n for _, n in shapes),
          "int4": nparams // 2 + 8 * sum(n * -(-k // args.group_size) for k, n in shapes)}
    print("weight bytes per pass: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in gb.items()))


if __name__ == "__main__":
    main()
