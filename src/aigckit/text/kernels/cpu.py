"""What this CPU and these libraries can do, and the kernel each mode selects here (``aigc doctor`` prints it).

The processors aigckit runs on differ: AVX-512 with VNNI and BF16, AVX2/FMA only, ARM. Three libraries compile for
them, each with its own switch to cap the instruction set (which is how the tests run every path on any machine):

    oneDNN   ONEDNN_MAX_CPU_ISA=AVX2 (or SSE41, AVX512_CORE, ...)     float32 prefill, w8a8 for many rows
    ATen     ATEN_CPU_CAPABILITY=avx2 (or default, avx512)           PyTorch's own vectorised ops
    numba    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=""            our GEMM, attention and fused decode kernels
             (NUMBA_CPU_NAME alone keeps the host's features, AVX-512 included; the empty feature string means
             "the named CPU's")

The one choice that depends on the ISA for correctness is w8a8's integer product: oneDNN's u8 x s8 kernel is exact
only with VNNI (without it, byte pairs are summed into int16 with saturation). ``onednn_u8s8_exact`` does not
trust flags: it runs that kernel once on inputs that saturate without VNNI and compares with exact integers.
Everything else is correct on every ISA (float kernels differ only in summation order) and is tested against its
reference under the caps above.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from aigckit.text.kernels._numba import ENABLED, NO_NUMBA_ENV, numba

__all__ = ["CpuInfo", "cpu_info", "isa_level", "onednn_u8s8_exact", "selection", "reference_notice", "report",
           "CAP_VARS"]

# flags worth knowing for these kernels (Linux /proc/cpuinfo names)
_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
          "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")
CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
            "AIGC_NO_NUMBA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR")


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    model: str  # the processor's model name
    flags: tuple[str, ...] = field(default_factory=tuple)  # the ISA flags of _FLAGS that this CPU has
    cpus: int = 1


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The CPU as the kernel reports it (``/proc/cpuinfo`` on Linux; the flags are the hardware's, not the caps)."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and model is None:
                    model = val.strip()
                elif key in ("flags", "features") and flags is None:
                    flags = set(val.split())
    except OSError:
        pass
    return CpuInfo(platform.machine(), model or platform.processor() or "unknown",
                   tuple(f for f in _FLAGS if f in (flags or ())), os.cpu_count() or 1)


def isa_level(info: CpuInfo | None = None) -> str:
    """A one-word summary of the hardware: "amx", "avx512_vnni", "avx512", "avx2", "avx", "sse", "arm" or "other"."""
    fl = set((info or cpu_info()).flags)
    for name, need in (("amx", {"amx_int8"}), ("avx512_vnni", {"avx512f", "avx512_vnni"}), ("avx512", {"avx512f"}),
                       ("avx2", {"avx2", "fma"}), ("avx", {"avx"}), ("sse", {"sse4_2"}), ("arm", {"asimd"})):
        if need <= fl:
            return name
    return "other"


@functools.lru_cache(maxsize=1)
def onednn_u8s8_exact() -> bool:
    """True when oneDNN's u8 x s8 product (``onednn.qlinear_u8s8``) is exact on this machine, as run, caps
    included. Checked on pairs of 255 x 127 (which saturate int16 without VNNI) and on random bytes."""
    from aigckit.text.kernels import onednn

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (16, 64), dtype=np.int8)
    w[:8] = 127
    w[8:12] = -127
    xq = rng.integers(-127, 128, (5, 64), dtype=np.int8)
    xq[:2] = 127
    packed = onednn.prepack_int8(torch.from_numpy(w))
    if packed is None:
        return False
    try:
        got = onednn.qlinear_u8s8(xq, packed, torch.ones(16))
    except RuntimeError:  # pragma: no cover - builds without the op
        return False
    want = xq.astype(np.int64) @ w.T.astype(np.int64)
    return bool(np.array_equal(got.astype(np.int64), want))


def selection(mode: str | None = None) -> dict[str, str]:
    """The kernel each mode ("fp32", "bf16", "int8", "int4", "w8a8") runs on this machine, as text; one mode's
    entry when ``mode`` is given (None means fp32)."""
    from aigckit.text.kernels import onednn

    fl = set(cpu_info().flags)
    if not ENABLED:
        why = "AIGC_NO_NUMBA is set" if NO_NUMBA_ENV else "numba is not installed"
        rows = {"fp32": f"torch F.linear ({why})", "int8": f"reference: dequantise + F.linear ({why})",
                "int4": f"reference: dequantise + F.linear ({why})",
                "w8a8": f"reference: fake-quantised float matmul ({why})"}
    else:
        dense = "oneDNN packed weights" if onednn.available() else "torch F.linear"
        rows = {"fp32": f"numba float32 tile + fused decode blocks (<= {onednn.SMALL_ROWS} rows), {dense} (more)",
                "int8": "numba int8 GEMV / tile + fused decode blocks",
                "int4": "numba int4 groups (SLP-vectorised unpacking) + fused decode blocks"}
        from aigckit.text.kernels.decode import W8A8_FUSED_ROWS

        if onednn_u8s8_exact():
            rows["w8a8"] = (f"numba exact int8 x int8 (<= {W8A8_FUSED_ROWS} rows, fused blocks), oneDNN u8 x s8 "
                            "(more rows; exact here)")
        else:
            rows["w8a8"] = (f"numba exact int8 x int8 for every row count: weight rows (<= {W8A8_FUSED_ROWS} rows, "
                            "fused blocks), weights packed in pairs (more rows) (oneDNN's u8 x s8 saturates here: "
                            "no VNNI)")
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & fl) and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in (
        "", "ALL", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10_1_512_AMX")
    rows["bf16"] = "torch bfloat16 (" + ("native AVX512_BF16/AMX" if native_bf16 else "converted to float32 in "
                                         "registers: no native bf16 here") + ")"
    order = ("fp32", "bf16", "int8", "int4", "w8a8")
    if mode is not None:
        key = "fp32" if mode in (None, "float32") else ("bf16" if mode == "bfloat16" else mode)
        return {key: rows[key]}
    return {k: rows[k] for k in order}


def reference_notice(mode: str | None) -> str | None:
    """A one-line notice when ``mode`` runs through a slow reference path here (no numba kernels), else None."""
    if ENABLED or mode is None:
        return None
    why = "AIGC_NO_NUMBA is set" if NO_NUMBA_ENV else "numba is not available on this platform"
    return f"aigckit: {mode} runs through the PyTorch reference path ({why}): correct, but slower"


def _onednn_isa() -> str:
    """oneDNN's own name for the ISA it dispatches to (from its verbose log of one tiny matmul), or 'unknown'."""
    try:
        fd, path = tempfile.mkstemp()
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(fd, 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), torch.ones(8, 8).to_mkldnn(), None, "none", [],
                                                   "")
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(fd)
        with open(path) as f:
            lines = [ln for ln in f if ",isa:" in ln]
        os.unlink(path)
    except (OSError, RuntimeError, AttributeError):
        return "unknown"
    return lines[0].rsplit(",isa:", 1)[1].strip() if lines else "unknown (already initialised)"


def _numba_vector_isa() -> str:
    """What numba's code for this machine uses, read from the assembly of a small compiled loop."""
    if numba is None:
        return "numba not installed"

    @numba.njit(fastmath=True, cache=False)
    def dot(a, b):  # pragma: no cover - compiled
        s = np.float32(0.0)
        for i in range(a.shape[0]):
            s += a[i] * b[i]
        return s

    a = np.ones(64, dtype=np.float32)
    dot(a, a)
    asm = next(iter(dot.inspect_asm().values()), "")
    for reg, name in (("zmm", "512-bit (AVX-512)"), ("ymm", "256-bit (AVX/AVX2)"), ("xmm", "128-bit (SSE)"),
                      ("v0.4s", "128-bit (NEON)")):
        if reg in asm:
            return name
    return "scalar"


def report(probe: bool = True) -> dict:
    """Everything ``aigc doctor`` prints: CPU, ISA flags, library versions and their ISA, threads, the kernel per
    mode, the store and numba cache paths, the cap variables that are set. ``probe`` runs the oneDNN and numba
    checks (a fraction of a second)."""
    import llvmlite

    from aigckit import __version__, store
    from aigckit.text.kernels import onednn

    info = cpu_info()
    nb: dict = {"version": getattr(numba, "__version__", None), "enabled": ENABLED}
    if numba is not None:
        import llvmlite.binding as ll

        nb.update(llvmlite=llvmlite.__version__, cpu_name=numba.config.CPU_NAME or ll.get_host_cpu_name(),
                  cpu_features=("(host)" if numba.config.CPU_FEATURES is None else numba.config.CPU_FEATURES or
                                "(those of cpu_name)"),
                  threads=numba.config.NUMBA_NUM_THREADS, threading_layer=numba.config.THREADING_LAYER,
                  cache_dir=numba.config.CACHE_DIR or os.path.join(os.path.dirname(__file__), "__pycache__"))
        if probe:
            nb["vector_code"] = _numba_vector_isa()
    dnnl = {"available": onednn.available(), "version": _onednn_version()}
    if probe:
        dnnl["isa"] = _onednn_isa()
        dnnl["u8s8_exact"] = onednn_u8s8_exact()
    return {
        "aigckit": __version__,
        "python": platform.python_version(),
        "cpu": {"model": info.model, "machine": info.machine, "cpus": info.cpus, "isa": isa_level(info),
                "flags": list(info.flags)},
        "torch": {"version": torch.__version__, "aten_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads()},
        "onednn": dnnl,
        "numba": nb,
        "kernels": selection(),
        "caps": {k: os.environ[k] for k in CAP_VARS if k in os.environ},
        "store": str(store.home()),
    }


def _onednn_version() -> str:
    cfg = torch.__config__.show()
    for line in cfg.splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.split("v", 1)[-1].split()[0] if " v" in line else line.strip()
    return "unknown"
