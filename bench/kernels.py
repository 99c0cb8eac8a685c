"""Time the linear kernels (weight-only int8/int4, w8a8, float32 numba tile and oneDNN) against fp32 / bf16 F.linear on the 211 SmolLM2-135M matrices.

    .venv/bin/python bench/kernels.py [--rows 1 5 16] [--repeats 7] [--threads N] [--blocks 30] [--baseline]

Each cell is the best of ``--repeats`` passes over all matrices (one pass = every linear once, like one decode
step, through the modules' forward, so Python overhead is included), all columns measured in the same process
with the same random weights; the columns are interleaved (one pass of each, repeated) so that load from other
processes on a shared machine hits them alike. ``--baseline`` adds the kernels of quant.py as committed in git
``HEAD`` (or ``--baseline-rev REV``), loaded as a separate module, for before/after numbers in one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aigckit.text import fastpath, quant


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


def load_baseline(rev: str):
    """quant.py as of git ``rev``, imported as a separate module (its numba cache goes to a temp dir)."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:src/aigckit/text/quant.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    d = Path(tempfile.mkdtemp(prefix="quant_baseline_"))
    f = d / "quant_baseline.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("quant_baseline", f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quant_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 5, 16], help="M = batch*tokens values")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--baseline", action="store_true", help="also time quant.py's kernels from git (see --baseline-rev)")
    ap.add_argument("--baseline-rev", default="HEAD")
    ap.add_argument("--no-dequant", action="store_true", help="skip the dequantise+BLAS columns")
    args = ap.parse_args()
    if args.threads:
        quant.set_num_threads(args.threads)
    base = load_baseline(args.baseline_rev) if args.baseline else None

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
    packed = [w.to_mkldnn() for w in w32] if fastpath.available() else None
    t = time.perf_counter()
    q4 = [quant.Int4Linear.from_linear(lin, args.group_size) for lin in lins]
    t_q4 = time.perf_counter() - t
    if base is not None:
        b8, b4 = [], []
        for a, b in zip(q8, q4):
            m8 = base.Int8Linear(a.in_features, a.out_features, bias=False)
            m8.qweight, m8.scale = a.qweight, a.scale
            m4 = base.Int4Linear(b.in_features, b.out_features, bias=False, group_size=args.group_size)
            m4.qweight, m4.scales, m4.mins = b.qweight, b.scales, b.mins
            b8.append(m8)
            b4.append(m4)
    nparams = sum(k * n for k, n in shapes)
    print(f"{len(shapes)} matrices, {nparams / 1e6:.1f} M weights; torch threads {torch.get_num_threads()}, "
          f"numba {quant.HAVE_NUMBA} threads {quant._numba.get_num_threads() if quant._numba else '-'}")
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
        "w8a8 (int_mm)": lambda xs: [m(xs[k]) for k, m in zip(ins, a8)],
        "fp32 numba tile": lambda xs: [quant.linear_f32(xs[k], w) for k, w in zip(ins, w32)],
    }
    if packed is not None:
        cols["fp32 oneDNN packed"] = lambda xs: [torch.ops.mkldnn._linear_pointwise(xs[k], p, None, "none", [], "")
                                                 for k, p in zip(ins, packed)]
    if base is not None:
        cols[f"int8 numba @{args.baseline_rev}"] = lambda xs: [m(xs[k]) for k, m in zip(ins, b8)]
        cols[f"int4 numba @{args.baseline_rev}"] = lambda xs: [m(xs[k]) for k, m in zip(ins, b4)]
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
