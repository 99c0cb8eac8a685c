"""Rows/s of `aigc batch`: one process vs Ray (N workers x T threads) on the same prompts, in one run.

    PYTHONPATH=src python bench/batch_speed.py --model smollm2-135m-instruct --rows 256 --tokens 64

Every row generates exactly --tokens tokens (greedy, EOS ignored). Times include loading the model(s) and, for
Ray, starting the local Ray; the per-row overhead is (Ray seconds - ideal) / rows, where ideal = one-process
seconds x threads-per-process / (workers x threads)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from aigckit.batch.runner import BatchArgs, run_batch
from aigckit.text.params import GenerationParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--local-threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--skip", choices=["local", "ray"], default=None)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="aigc-batch-bench-"))
    topics = ["the sea", "a city at night", "bread", "mountains", "a library", "rain", "trains", "a garden"]
    rows = [{"id": f"p{i}", "prompt": f"Write a short paragraph about {topics[i % len(topics)]} (#{i}):"}
            for i in range(a.rows)]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = GenerationParams(temperature=0, max_new_tokens=a.tokens, ignore_eos=True)
    out = {}
    if a.skip != "local":
        out["local"] = run_batch(BatchArgs(input=str(tmp / "in.jsonl"), output=str(tmp / "local.jsonl"),
                                           model=a.model, params=params, threads=a.local_threads,
                                           max_batch=a.max_batch), progress=False)
        print(json.dumps({"local": out["local"]}), flush=True)
    if a.skip != "ray":
        out["ray"] = run_batch(BatchArgs(input=str(tmp / "in.jsonl"), output=str(tmp / "ray.jsonl"), model=a.model,
                                         params=params, threads=a.worker_threads, max_batch=a.max_batch, ray=True,
                                         workers=a.workers), progress=False)
        print(json.dumps({"ray": out["ray"]}), flush=True)
    if len(out) == 2:
        ideal = out["local"]["seconds"] * a.local_threads / (a.workers * a.worker_threads)
        print(json.dumps({"ratio_ray_over_local_rows_per_s": round(out["ray"]["rows_per_s"] /
                                                                   out["local"]["rows_per_s"], 3),
                          "overhead_per_row_s": round((out["ray"]["seconds"] - ideal) / a.rows, 4)}))


if __name__ == "__main__":
    main()
