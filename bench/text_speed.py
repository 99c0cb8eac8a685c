"""Text-generation speed, side by side in one run: aigckit vs transformers (and llama-cpp-python when installed).

Rows: load-to-first-token (s), prefill tok/s (512-token prompt), decode tok/s at batch 1, beam search (5 beams)
tok/s, aggregate tok/s for 16 prompts x 64 tokens as one batched generate, the same 16 requests submitted at
once to aigckit's continuous-batching scheduler (the server's path), peak RSS (MB). Same GGUF file for every engine.

    .venv/bin/python bench/text_speed.py                      # aigckit fp32 vs transformers fp32 (+ llama.cpp)
    .venv/bin/python bench/text_speed.py --variants fp32,bf16,int8,int4 --json bench/text_speed.json

    .venv/bin/python bench/text_speed.py --variants fp32,int8,w8a8 --rounds 3 --repeat 2   # interleaved rounds

    .venv/bin/python bench/text_speed.py --cap avx2 --llama-cpp-avx2 /work/llama-avx2 ...       # as an AVX2 CPU

``--cap avx2`` runs every engine as on a CPU with AVX2/FMA but no AVX-512 or VNNI: oneDNN, ATen, MKL and numba are
capped by their environment variables (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS,
NUMBA_CPU_NAME + NUMBA_CPU_FEATURES), and llama.cpp, which picks its kernels when it is built, is imported from
``--llama-cpp-avx2 DIR``: a llama-cpp-python built with ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"`` and installed with ``pip install --target DIR``.

Each engine runs in its own subprocess (clean peak-RSS numbers, no shared thread pools). With ``--rounds N`` every
engine runs N times, interleaved, and each cell keeps its best: on a shared VM whose speed drifts over minutes this
compares engines under the same conditions instead of giving one engine a slow spell. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_GGUF = Path(os.environ.get("AIGC_HOME", Path.home() / ".cache/aigckit")) / \
    "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
SEED_TEXT = ("The history of science is the study of the development of science and scientific knowledge, "
             "including both the natural and social sciences. ")
PROMPTS16 = [f"Write a short note number {i} about {t}:" for i, t in enumerate(
    ["cats", "the sea", "winter", "coffee", "trains", "music", "bread", "stars", "rivers", "books",
     "gardens", "bicycles", "rain", "mountains", "clocks", "letters"])]


def best(a, fn) -> float:
    """Best wall time of ``a.repeat`` runs after one untimed warm-up run (the machine may be shared: the minimum is
    the least disturbed run). The warm-up matters: oneDNN builds its primitives for a new shape on first use, and a
    512-token prefill was measured at 645 tok/s best of two cold runs vs 1128 warm (AVX-512 CPU, 2026-12-07)."""
    fn()
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- engines
def run_aigckit(gguf: str, variant: str, a) -> dict:
    from aigckit.text.lm import load_lm

    dtype = "bfloat16" if variant == "bf16" else "float32"
    quant = variant if variant in ("int8", "int4", "w8a8") else None  # (also for --base trees before QUANT_MODES)
    t0 = time.perf_counter()
    lm = load_lm(gguf, dtype=dtype, quantize=quant, threads=a.threads)
    lm.generate("Hello", temperature=0, max_new_tokens=1)
    load_ttft = time.perf_counter() - t0
    ids512 = (lm.tokenizer.encode(SEED_TEXT * 40))[:512]

    def gen(n, **kw):
        t = time.perf_counter()
        lm.generate(ids512[:32] if "prompt" not in kw else kw.pop("prompt"), temperature=0, max_new_tokens=n,
                    ignore_eos=True, **kw)
        return time.perf_counter() - t

    res = {"engine": f"aigckit {variant}", "load_ttft_s": load_ttft}
    res["prefill_tok_s"] = 512 / best(a, lambda: lm.generate(ids512, temperature=0, max_new_tokens=1, ignore_eos=True))
    t1, tn = best(a, lambda: gen(1)), best(a, lambda: gen(a.decode_tokens))
    res["decode_tok_s"] = (a.decode_tokens - 1) / (tn - t1)
    res["beam5_tok_s"] = a.beam_tokens / best(a, lambda: lm.generate(ids512[:32], num_beams=5,
                                                                     max_new_tokens=a.beam_tokens, ignore_eos=True))
    res["batch16_tok_s"] = 16 * 64 / best(a, lambda: lm.generate_batch(PROMPTS16, temperature=0, max_new_tokens=64,
                                                                       ignore_eos=True))
    from aigckit.text.scheduler import Scheduler

    sched = Scheduler(lm, max_batch=16, max_seq_len=256)  # one long-lived scheduler, as in `aigc serve`
    try:
        concurrent16(lm, sched)  # warm-up: the scheduler thread's first round
        res["concurrent16_tok_s"] = 16 * 64 / best(a, lambda: concurrent16(lm, sched))
    finally:
        sched.close()
    res["peak_rss_mb"] = rss_mb()
    return res


def concurrent16(lm, sched) -> None:
    """16 requests submitted at once to the continuous-batching scheduler (what `aigc serve` runs): admitted
    together, prefilled in one forward, then decoded together; returns when every request has its 64 tokens."""
    from aigckit.text.engine import GenerationParams

    params = GenerationParams(temperature=0, max_new_tokens=64, ignore_eos=True)
    handles = [sched.submit(lm.tokenizer.encode(p), params) for p in PROMPTS16]
    n = sum(ev.token_id is not None for h in handles for ev in h)
    assert n == 16 * 64, n


def run_transformers(gguf: str, a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    p = Path(gguf)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, torch_dtype=torch.float32).eval()
    x = tok("Hello", return_tensors="pt")
    model.generate(**x, max_new_tokens=1, do_sample=False)
    load_ttft = time.perf_counter() - t0
    ids512 = tok(SEED_TEXT * 40, return_tensors="pt").input_ids[:, :512]

    def gen(ids, n, **kw):
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=tok.eos_token_id, **kw)
        return time.perf_counter() - t

    res = {"engine": "transformers fp32", "load_ttft_s": load_ttft}
    res["prefill_tok_s"] = 512 / best(a, lambda: gen(ids512, 1))
    t1 = best(a, lambda: gen(ids512[:, :32], 1))
    tn = best(a, lambda: gen(ids512[:, :32], a.decode_tokens))
    res["decode_tok_s"] = (a.decode_tokens - 1) / (tn - t1)
    res["beam5_tok_s"] = a.beam_tokens / best(a, lambda: gen(ids512[:, :32], a.beam_tokens, num_beams=5))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS16, return_tensors="pt", padding=True)
    def batched():
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                           pad_token_id=tok.pad_token_id)

    res["batch16_tok_s"] = 16 * 64 / best(a, batched)
    res["peak_rss_mb"] = rss_mb()
    return res


def run_llamacpp(gguf: str, a) -> dict:
    from llama_cpp import Llama

    threads = a.threads or os.cpu_count()
    t0 = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    llm("Hello", max_tokens=1)
    load_ttft = time.perf_counter() - t0
    ids512 = llm.tokenize((SEED_TEXT * 40).encode())[:512]

    def gen(ids, n):
        llm.reset()
        t = time.perf_counter()
        count = 0
        for _ in llm.generate(ids, temp=0.0, reset=True):
            count += 1
            if count >= n:
                break
        return time.perf_counter() - t

    res = {"engine": "llama.cpp Q4_1", "load_ttft_s": load_ttft}
    res["prefill_tok_s"] = 512 / best(a, lambda: gen(ids512, 1))
    t1, tn = best(a, lambda: gen(ids512[:32], 1)), best(a, lambda: gen(ids512[:32], a.decode_tokens))
    res["decode_tok_s"] = (a.decode_tokens - 1) / (tn - t1)
    res["beam5_tok_s"] = None

    def sixteen():
        for p in PROMPTS16:  # llama-cpp-python serves one sequence at a time
            llm(p, max_tokens=64, temperature=0.0)

    res["batch16_tok_s"] = 16 * 64 / best(a, sixteen)
    res["peak_rss_mb"] = rss_mb()
    return res


# ---------------------------------------------------------------------------------------------- driver
COLS = [("load_ttft_s", "load->1st tok s"), ("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
        ("beam5_tok_s", "beam-5 tok/s"), ("batch16_tok_s", "16 prompts tok/s"),
        ("concurrent16_tok_s", "16 concurrent tok/s"), ("peak_rss_mb", "peak RSS MB")]


def merge_best(runs: list[dict]) -> dict:
    """One row from several runs of an engine: the best of each cell (highest rate, shortest load; peak RSS is
    the largest seen)."""
    row = dict(runs[0])
    for r in runs[1:]:
        for k, v in r.items():
            if not isinstance(v, (int, float)) or not isinstance(row.get(k), (int, float)):
                continue
            row[k] = min(row[k], v) if k == "load_ttft_s" else max(row[k], v)
    row["runs"] = len(runs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=str(DEFAULT_GGUF))
    ap.add_argument("--variants", default="fp32", help="aigckit variants: fp32,bf16,int8,int4,w8a8")
    ap.add_argument("--peers", default="transformers,llama-cpp")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--beam-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, interleaved (A B C A B C ...), and keep each cell's best: "
                         "a slow spell of a shared machine then hits all engines alike, not one engine's whole column")
    ap.add_argument("--cap", choices=["avx2"], help="run every engine as on a CPU of this class (see above)")
    ap.add_argument("--llama-cpp-avx2", help="folder holding an AVX2-only llama-cpp-python build (for --cap avx2)")
    ap.add_argument("--base", metavar="DIR",
                    help="also run the aigckit variants from another checkout (its src/ first on the path), labelled "
                         "'base': an interleaved before/after comparison in one run")
    ap.add_argument("--json", default="bench/text_speed.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # child process: run one engine, print its JSON
        kind, _, variant = a.one.partition(":")
        fn = {"aigckit": lambda: run_aigckit(a.gguf, variant, a), "aigckit-base": lambda: run_aigckit(a.gguf, variant, a),
              "transformers": lambda: run_transformers(a.gguf, a), "llama-cpp": lambda: run_llamacpp(a.gguf, a)}[kind]
        res = fn()
        if kind == "aigckit-base":
            res["engine"] = res["engine"].replace("aigckit", "aigckit base")
        print("RESULT " + json.dumps(res))
        return
    jobs = [f"aigckit:{v}" for v in a.variants.split(",") if v]
    if a.base:
        jobs += [f"aigckit-base:{v}" for v in a.variants.split(",") if v]
    jobs += [p for p in a.peers.split(",") if p]
    env = dict(os.environ)
    if a.cap == "avx2":
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                   NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="")
    llama_env = dict(env)
    if "llama-cpp" in jobs:
        if a.cap == "avx2":
            if not a.llama_cpp_avx2:
                sys.exit("--cap avx2 with llama-cpp needs --llama-cpp-avx2 DIR (an AVX2-only build; see --help)")
            llama_env["PYTHONPATH"] = a.llama_cpp_avx2 + os.pathsep + env.get("PYTHONPATH", "")
        probe = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info())"],
                               env=llama_env, capture_output=True, text=True)
        if probe.returncode != 0:
            print("llama-cpp-python not installed: skipping its column", file=sys.stderr)
            jobs.remove("llama-cpp")
        else:
            print(f"llama.cpp: {probe.stdout.strip()}", file=sys.stderr)
    results: dict[str, list[dict]] = {job: [] for job in jobs}
    for rnd in range(a.rounds):
        for job in jobs:
            cmd = [sys.executable, __file__, "--one", job, "--gguf", a.gguf, "--decode-tokens", str(a.decode_tokens),
                   "--beam-tokens", str(a.beam_tokens), "--repeat", str(a.repeat)] + (["--threads", str(a.threads)] if a.threads else [])
            print(f"running {job} (round {rnd + 1}/{a.rounds}) ...", file=sys.stderr)
            job_env = llama_env if job == "llama-cpp" else env
            if job.startswith("aigckit-base:"):
                job_env = dict(env, PYTHONPATH=str(Path(a.base) / "src") + os.pathsep + env.get("PYTHONPATH", ""))
            out = subprocess.run(cmd, capture_output=True, text=True, env=job_env)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(f"{job} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[job].append(json.loads(line[0][7:]))
    rows = [merge_best(rs) for rs in results.values() if rs]
    header = f"{'engine':<20}" + "".join(f"{h:>18}" for _, h in COLS)
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = "".join(f"{r[k]:>18.1f}" if isinstance(r.get(k), (int, float)) else f"{'-':>18}" for k, _ in COLS)
        print(f"{r['engine']:<20}{cells}")
    doctor = json.loads(subprocess.run([sys.executable, "-m", "aigckit", "doctor", "--json"], env=env,
                                       capture_output=True, text=True).stdout)
    print(f"CPU: {doctor['cpu']['model']} ({doctor['cpu']['isa']}); cap: {a.cap or 'none'}; oneDNN ISA "
          f"{doctor['onednn'].get('isa')}; numba {doctor['numba'].get('vector_code')}")
    meta = {"cpu": doctor["cpu"], "cap": a.cap, "onednn_isa": doctor["onednn"].get("isa"),
            "numba_vector_code": doctor["numba"].get("vector_code"), "kernels": doctor["kernels"],
            "machine": os.uname().machine, "cpus": os.cpu_count(), "threads": a.threads, "rounds": a.rounds,
            "repeat": a.repeat,
            "gguf": a.gguf, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
