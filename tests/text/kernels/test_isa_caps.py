"""Every ISA path on any machine: the kernel, quantisation and quality tests run again in subprocesses with the
instruction set capped (oneDNN, ATen and numba each have their own switch), and without numba. A cap that this
machine does not honour skips with the reason; it never passes silently.

Also: the caches that outlive a process (numba's compiled kernels, the store's quantised weights) built under one
ISA and loaded under another give the same results and no crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aigckit.text.kernels import cpu

ROOT = Path(__file__).resolve().parents[3]
CAPS = {
    # an AVX2/FMA CPU without AVX-512 or VNNI (most laptops, many cloud CPUs)
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "NUMBA_CPU_NAME": "haswell",
             "NUMBA_CPU_FEATURES": "", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    # an old x86-64 CPU: SSE4 only
    "sse4": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default", "NUMBA_CPU_NAME": "nehalem",
             "NUMBA_CPU_FEATURES": "", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    # no numba kernels at all (numba missing, or a platform it does not support): the PyTorch reference paths
    "no-numba": {"AIGC_NO_NUMBA": "1"},
}
# what each cap must show in `aigc doctor --json` for the run to count: (oneDNN ISA, ATen capability, numba code)
EXPECT = {"avx2": ("AVX2", "AVX2", "256-bit"), "sse4": ("SSE4.1", "DEFAULT", "128-bit"), "no-numba": (None, None, None)}
KERNEL_TESTS = ["tests/text/kernels/test_gemm.py", "tests/text/kernels/test_decode.py", "tests/text/test_quant.py"]
TESTS = {"avx2": KERNEL_TESTS + ["tests/text/test_smoothquant.py", "tests/text/test_model_parity.py",
                                 "tests/text/test_quant_quality.py"],
         "sse4": KERNEL_TESTS,
         "no-numba": KERNEL_TESTS + ["tests/text/test_model_parity.py", "tests/text/test_quant_quality.py"]}
_nested = pytest.mark.skipif(any(k in os.environ for k in ("ONEDNN_MAX_CPU_ISA", "NUMBA_CPU_NAME", "AIGC_NO_NUMBA")),
                             reason="already running under an ISA cap")
_x86 = pytest.mark.skipif(cpu.cpu_info().machine not in ("x86_64", "AMD64"), reason="x86 caps on a non-x86 CPU")


def _env(cap: str, **extra: str) -> dict:
    """This process's environment without any ISA cap, plus ``cap``'s ("native": none)."""
    env = {k: v for k, v in os.environ.items() if k not in cpu.CAP_VARS or k == "OMP_NUM_THREADS"}
    env.update(CAPS.get(cap, {}), PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _report(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "aigckit", "doctor", "--json"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _check_honoured(cap: str, rep: dict) -> None:
    """Skip (with the reason) when the machine did not apply the cap; fail when it claims a wider ISA than asked."""
    if cap == "no-numba":
        assert not rep["numba"]["enabled"] and all("reference" in v or "torch" in v for k, v in
                                                     rep["kernels"].items() if k != "bf16")
        return
    dnnl, aten, vec = EXPECT[cap]
    got = (rep["onednn"].get("isa", ""), rep["torch"]["aten_capability"], rep["numba"].get("vector_code", ""))
    if "unknown" in got[0] or not rep["numba"]["enabled"]:
        pytest.skip(f"cannot see which ISA oneDNN / numba use here: {got}")
    if dnnl not in got[0] or got[1] != aten or not got[2].startswith(vec):
        pytest.skip(f"cap {cap} not honoured on this machine (oneDNN {got[0]!r}, ATen {got[1]!r}, numba {got[2]!r})"
                    f": the {cap} paths are not tested here")
    assert "512" not in got[0] and "zmm" not in got[2]


@pytest.mark.slow
@_nested
@_x86
@pytest.mark.parametrize("cap", list(CAPS))
def test_kernel_and_quality_tests_pass_under_cap(cap):
    if cap == "avx2" and cpu.isa_level() == "avx2":
        # oneDNN, ATen and numba already run their AVX2 code in this session's own (uncapped) tests
        pytest.skip("this CPU's own ISA is AVX2 (no AVX-512): the uncapped run of these tests is the AVX2 path")
    env = _env(cap, OMP_NUM_THREADS="1")
    _check_honoured(cap, _report(env))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS[cap]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1500)
    tail = "\n".join(out.stdout.splitlines()[-25:])
    assert out.returncode == 0, f"under {cap}:\n{tail}\n{out.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail, tail


def test_w8a8_kernel_choice_follows_the_exactness_probe():
    # the probe decides, not the flags: wherever oneDNN's u8 x s8 is not exact, every w8a8 row count runs numba
    sel = cpu.selection("w8a8")["w8a8"]
    if not cpu.report(probe=False)["numba"]["enabled"]:
        assert "reference" in sel
    elif cpu.onednn_u8s8_exact():
        assert "oneDNN" in sel and "exact here" in sel
    else:
        assert "every row count" in sel


_RUN = r"""
import json, sys
import torch
from aigckit.text.lm import load_lm
out = {}
torch.manual_seed(0)
ids = torch.randint(3, 90, (1, 12)).tolist()[0]
for mode in (None, "int8", "int4", "w8a8"):
    lm = load_lm(sys.argv[1], quantize=mode)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids]))[0, -1]
    res = lm.generate(ids, temperature=0, max_new_tokens=6, ignore_eos=True)
    out[str(mode)] = {"logits": logits.tolist(), "tokens": res.token_ids, "choice": lm.kernel_choice}
print(json.dumps(out))
"""


@pytest.mark.slow
@_nested
@_x86
def test_caches_built_under_one_isa_load_under_another(tiny_llama_dir, tmp_path):
    """The store's quantised weights and numba's on-disk kernels, made on this CPU and reused on one with fewer
    features (a home directory or store shared between machines, the case that could load instructions the CPU
    lacks): same results, no crash."""
    first, second = "native", ("avx2" if cpu.isa_level() in ("amx", "avx512_vnni", "avx512") else "sse4")
    base = {"AIGC_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}

    def run(cap: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _RUN, str(tiny_llama_dir)], env=_env(cap, **base),
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])

    a = run(first)
    assert any((tmp_path / "home" / "cache").iterdir())  # quantised weights cached in the store
    b = run(second)
    for mode in ("None", "int8", "int4", "w8a8"):
        la, lb = torch.tensor(a[mode]["logits"]), torch.tensor(b[mode]["logits"])
        # float summation order differs between vector widths; w8a8 also its activation rounding at ties
        tol = 2e-2 if mode == "w8a8" else 1e-4
        torch.testing.assert_close(lb, la, atol=tol * float(la.abs().max()), rtol=0)


_STATS = r"""
import json
from aigckit.text.kernels import gemm
gemm.compile_kernels("int8")
st = gemm._int8_kernel.stats
print(json.dumps([sum(st.cache_hits.values()), sum(st.cache_misses.values())]))
"""


@pytest.mark.slow
@_nested
@_x86
def test_numba_cache_keeps_one_entry_per_cpu(tmp_path):
    """A numba cache shared between CPU classes never hands one CPU's machine code to another: a capped run misses
    the native entry and compiles its own, and each later run hits its own entry."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba"), "OMP_NUM_THREADS": "1"}
    lower = "avx2" if cpu.isa_level() in ("amx", "avx512_vnni", "avx512") else "sse4"

    def run(cap: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _STATS], env=_env(cap, **env), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.splitlines()[-1])

    assert run("native") == [0, 1]  # [cache hits, misses]: compiled and stored
    assert run(lower) == [0, 1]  # another CPU: the native entry is not used
    assert run(lower) == [1, 0] and run("native") == [1, 0]  # both entries kept side by side


@pytest.mark.slow
@_nested
def test_without_kernels_every_mode_runs_with_a_one_line_notice(tiny_llama_dir):
    """Where the numba kernels cannot run (no numba for the platform, or switched off), each mode still generates,
    through the PyTorch reference path, and says so once on stderr; never a crash."""
    env = _env("no-numba", OMP_NUM_THREADS="1")
    for mode in ("int8", "int4", "w8a8"):
        out = subprocess.run([sys.executable, "-m", "aigckit", "text", "w5 w6 w7", "--model", str(tiny_llama_dir),
                              "--quantize", mode, "-t", "0", "--max-new-tokens", "4", "--json"], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        notices = [ln for ln in out.stderr.splitlines() if "reference path" in ln]
        assert len(notices) == 1 and mode in notices[0], out.stderr
        assert len(json.loads(out.stdout)["token_ids"]) == 4
