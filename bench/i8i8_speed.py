"""w8a8's exact int8 x int8 products for several rows: the packed-pairs kernel (``kernels/i8pairs.py``, what
3+ rows run on CPUs without VNNI) against the one-weight-row-at-a-time kernel (``gemm.i8i8_block``, what 1-2 rows
run) and torch's float32 ``F.linear`` on SmolLM2-135M's matrix shapes. GOPS = 2 M N K / time, best of --repeat.

    .venv/bin/python bench/i8i8_speed.py --rows 16 --threads 2

Not run in CI (timings); the kernels' exactness is tested in tests/text/kernels/test_gemm.py.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aigckit.text.kernels import cpu, gemm, i8pairs

SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    gemm.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    m = a.rows
    print(f"CPU: {cpu.cpu_info().model} ({cpu.isa_level()}), {a.threads} threads, {m} rows; GOPS")
    print(f"{'matrix':<10}{'packed pairs':>14}{'weight rows':>14}{'torch f32':>12}")
    for name, n, k in SHAPES:
        w = rng.integers(-127, 128, (n, k), dtype=np.int8)
        xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
        ws, yw = np.ones(n, np.float32), np.empty((m, n), np.float32)
        wp = i8pairs.pack_pairs(w)
        gemm.compile_kernels("w8a8")
        t_pairs = best(lambda: i8pairs.packed_product(xq, wp, ws, yw), a.repeat)
        t_rows = best(lambda: gemm._i8i8_kernel(xq, w, ws, yw), a.repeat)
        xf, wf = torch.randn(m, k), torch.randn(n, k)
        t_f32 = best(lambda: torch.nn.functional.linear(xf, wf), a.repeat)
        ops = 2 * m * n * k / 1e9
        print(f"{name:<10}{ops / t_pairs:>14.1f}{ops / t_rows:>14.1f}{ops / t_f32:>12.1f}")


if __name__ == "__main__":
    main()
