"""Fast CPU kernels of the text engine, behind plain functions with public names; the PyTorch code in ``model.py``
and ``quant.py`` is the reference every kernel is tested against.

    cpu.py        what this CPU and these libraries can do, the kernel each mode selects (``aigc doctor``)
    gemm.py       numba GEMM / GEMV: float32 tile, int8 and int4 weight rows, exact int8 x int8 (w8a8),
                  per-row activation quantisation; compilation helpers
    i8pairs.py    exact int8 x int8 for many rows: weights packed in pairs, a 4 x 16 tile in LLVM vector IR (pmaddwd)
    onednn.py     oneDNN: prepacked float32 linears (``OneDNNLinear``), u8 x s8 products where exact
    attention.py  one decode step of attention per layer: RoPE + KV-cache write + attention
    decode.py     fused decode steps: a whole Llama block in two calls, per-thread ``Workspace``

One switch turns every numba kernel off: ``AIGC_NO_NUMBA=1`` (read at import; also off when numba is missing).
"""

from aigckit.text.kernels._numba import ENABLED

__all__ = ["ENABLED"]
