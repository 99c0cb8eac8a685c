"""Load time: a fresh process loads SmolLM2 from the store and writes one token, per mode, in interleaved rounds.

Two numbers per run: ``load->1st token`` (from before ``load_lm`` to the first generated token, the library's own
cost; imports excluded) and ``process`` (the whole ``aigc text PROMPT --max-new-tokens 1`` command, timed from
outside: Python, torch and the imports included). Every load here is a second load: the first one of a GGUF
dequantises and caches it (and ``--quantize`` modes their packed weights), so run a mode once before measuring.

    .venv/bin/python bench/load_speed.py --rounds 4 --variants fp32,int8,w8a8

Not run in CI. Prints one JSON object per measurement and a summary (median and best per mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time
from aigckit.text.lm import load_lm
t0 = time.perf_counter()
lm = load_lm(sys.argv[1], quantize=None if sys.argv[2] == "fp32" else sys.argv[2], threads=int(sys.argv[3]))
lm.generate("Hello", temperature=0, max_new_tokens=1)
print(time.perf_counter() - t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", default="fp32,int8,w8a8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    variants = a.variants.split(",")
    for v in variants:  # warm the store's caches (the first load of a mode dequantises / quantises)
        subprocess.run([sys.executable, "-c", CHILD, a.model, v, str(a.threads)], check=True, capture_output=True)
    res: dict[str, dict[str, list[float]]] = {v: {"load_s": [], "process_s": []} for v in variants}
    for r in range(a.rounds):
        for v in variants:
            out = subprocess.run([sys.executable, "-c", CHILD, a.model, v, str(a.threads)], check=True,
                                 capture_output=True, text=True).stdout
            res[v]["load_s"].append(float(out.strip().splitlines()[-1]))
            cmd = [sys.executable, "-m", "aigckit", "text", "Hello", "--model", a.model, "--max-new-tokens", "1",
                   "--temperature", "0", "--threads", str(a.threads)] + ([] if v == "fp32" else ["--quantize", v])
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            res[v]["process_s"].append(time.perf_counter() - t)
            print(json.dumps({"round": r, "variant": v, "load_s": res[v]["load_s"][-1],
                              "process_s": res[v]["process_s"][-1]}), flush=True)
    print(f"{'mode':<6} {'load->1st token s (median / best)':>36} {'whole process s (median / best)':>34}")
    for v, d in res.items():
        print(f"{v:<6} {statistics.median(d['load_s']):>25.2f} / {min(d['load_s']):.2f} "
              f"{statistics.median(d['process_s']):>24.2f} / {min(d['process_s']):.2f}")


if __name__ == "__main__":
    main()
