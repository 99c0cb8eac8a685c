"""Rows/s of `aigc batch`: one process (2 threads) vs Ray (2 workers x 1 thread), interleaved, with the overhead.

    PYTHONPATH=src python bench/batch_speed.py                      # 256 prompts x 64 tokens, 2 rounds
    PYTHONPATH=src python bench/batch_speed.py --rows 16 --tokens 8 --rounds 1    # a quick check that it works

Each job is the command a user runs, in a fresh process (`python -m aigckit batch ... --json`), timed from outside
(wall clock: interpreter start, imports, model load, Ray start-up, generation, writing). Every row generates exactly
--tokens tokens (greedy, `--ignore-eos`). Per round and backend three jobs run, and the backends alternate which
goes first (A B / B A ...), so a machine that slows down (a shared one) is spread over both:

  start-up   1 row x 1 token: everything but the rows (interpreter, imports, model load; Ray: its start-up, the
             actors and their models)
  per row    (N rows x 1 token - start-up) / (N - 1): what a row costs besides decoding its tokens (prompt prefill,
             scheduling, Ray's transport of rows and results, writing the line)
  full       N rows x T tokens: rows/s = N / full; steady rows/s = N / (full - start-up)

The table gives the median over rounds (min to max in brackets when --rounds > 1); --json adds every job's numbers.

Time: a round of the defaults is about 3.5 minutes on a quiet 2-core AVX2 machine (estimated from the ~210 tok/s of
16 concurrent float32 sequences in docs/PERFORMANCE.md, and 5 s / 20 s start-ups); a round that would end past
--budget-minutes (default 10) is not started, and the table says how many rounds ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a city at night", "bread", "mountains", "a library", "rain", "trains", "a garden"]


def backends(a) -> dict[str, list[str]]:
    return {f"one process, {a.local_threads} threads": ["--threads", str(a.local_threads)],
            f"Ray, {a.workers} workers x {a.worker_threads} thread": ["--ray", "--workers", str(a.workers),
                                                                      "--threads", str(a.worker_threads)]}


def write_rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Write a short paragraph about "
                                                                 f"{TOPICS[i % len(TOPICS)]} (#{i}):"}) + "\n"
                            for i in range(n)))
    return path


def job(a, flags: list[str], rows: Path, tokens: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "aigckit", "batch", "--input", str(rows), "--output", str(out), "--overwrite",
           "--model", a.model, "-t", "0", "--max-new-tokens", str(tokens), "--ignore-eos", "--max-batch",
           str(a.max_batch), "--quiet", "--json", *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    want = s["rows"] * tokens
    if s["errors"] or s["completion_tokens"] != want:
        sys.exit(f"{s['errors']} errors, {s['completion_tokens']} tokens instead of {want}: {' '.join(cmd)}")
    return {"wall_s": round(wall, 3), "job_s": s["seconds"], "rows": s["rows"], "tokens": s["completion_tokens"]}


def fmt(values: list[float], digits: int) -> str:
    med = f"{statistics.median(values):.{digits}f}"
    return med if len(values) == 1 else f"{med} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="store name, .gguf or HF folder")
    ap.add_argument("--rows", "-n", type=int, default=256, help="prompts (N, default 256)")
    ap.add_argument("--tokens", "-T", type=int, default=64, help="tokens generated per prompt (T, default 64)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per process/worker")
    ap.add_argument("--local-threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--budget-minutes", type=float, default=10.0,
                    help="do not start a round that would end past this (default 10); the first always runs")
    ap.add_argument("--json", action="store_true", help="also print every job's numbers as JSON")
    a = ap.parse_args()
    if a.rows < 2 or a.tokens < 1 or a.rounds < 1:
        ap.error("--rows must be >= 2, --tokens >= 1, --rounds >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="aigc-batch-bench-"))
    one, many = write_rows(tmp / "one.jsonl", 1), write_rows(tmp / "rows.jsonl", a.rows)
    names = backends(a)
    res: dict[str, list[dict]] = {n: [] for n in names}
    t_all = time.perf_counter()
    done = 0
    for r in range(a.rounds):
        spent = time.perf_counter() - t_all
        if r and spent + spent / r > a.budget_minutes * 60:
            print(f"stopping after {r} round(s): another would end past --budget-minutes {a.budget_minutes:g}",
                  file=sys.stderr)
            break
        done += 1
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for name in order:
            flags, out = names[name], tmp / "out.jsonl"
            start = job(a, flags, one, 1, out)
            small = job(a, flags, many, 1, out)
            full = job(a, flags, many, a.tokens, out)
            res[name].append({"start": start, "small": small, "full": full})
            print(f"round {r + 1} {name}: start-up {start['wall_s']:.1f} s, {a.rows} x 1 token "
                  f"{small['wall_s']:.1f} s, {a.rows} x {a.tokens} tokens {full['wall_s']:.1f} s", file=sys.stderr)
    rows = {}
    for name, rounds in res.items():
        st = [x["start"]["wall_s"] for x in rounds]
        rows[name] = {
            "rows_per_s": [a.rows / x["full"]["wall_s"] for x in rounds],
            "steady_rows_per_s": [a.rows / max(1e-9, x["full"]["wall_s"] - x["start"]["wall_s"]) for x in rounds],
            "steady_tokens_per_s": [a.rows * a.tokens / max(1e-9, x["full"]["wall_s"] - x["start"]["wall_s"])
                                    for x in rounds],
            "startup_s": st,
            "per_row_ms": [1000 * (x["small"]["wall_s"] - x["start"]["wall_s"]) / (a.rows - 1) for x in rounds]}
    local, ray = list(rows)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    print(f"\n`aigc batch`, {a.model}, {a.rows} prompts x {a.tokens} tokens (greedy, EOS ignored), max batch "
          f"{a.max_batch}, {done} interleaved round(s) of {a.rounds}; {cpu}, {os.cpu_count()} CPUs; "
          f"{time.perf_counter() - t_all:.0f} s in all\n")
    print("| backend | rows/s | steady rows/s | steady tokens/s | start-up s | per row, beside decoding (ms) |")
    print("|---|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {fmt(m['rows_per_s'], 2)} | {fmt(m['steady_rows_per_s'], 2)} | "
              f"{fmt(m['steady_tokens_per_s'], 1)} | {fmt(m['startup_s'], 1)} | {fmt(m['per_row_ms'], 1)} |")
    ratio = [b / c for b, c in zip(rows[ray]["rows_per_s"], rows[local]["rows_per_s"])]
    ratio_steady = [b / c for b, c in zip(rows[ray]["steady_rows_per_s"], rows[local]["steady_rows_per_s"])]
    extra = [b - c for b, c in zip(rows[ray]["per_row_ms"], rows[local]["per_row_ms"])]
    print(f"| Ray / one process | {fmt(ratio, 2)}x | {fmt(ratio_steady, 2)}x | | "
          f"+{fmt([b - c for b, c in zip(rows[ray]['startup_s'], rows[local]['startup_s'])], 1)} s | "
          f"{'+' if statistics.median(extra) >= 0 else ''}{fmt(extra, 1)} |")
    if a.json:
        print(json.dumps({"args": vars(a), "jobs": res}))


if __name__ == "__main__":
    main()
