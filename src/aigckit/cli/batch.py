"""`aigc batch`: offline generation for a file of prompts, in one process or on Ray (parsing only)."""

from __future__ import annotations

import argparse
import json
import sys

from aigckit.cli.text import _gen_args, _model_args, _params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="generate for every row of a JSONL/Parquet file (resumable; --ray for a Ray cluster)",
        description="Reads rows ({\"id\": ..., \"prompt\": ...} or {\"messages\": [...]}, optional per-row "
                    "max_new_tokens/temperature/top_p/top_k/seed/stop), generates with continuous batching and "
                    "appends one JSON line per row as it finishes: id, text, finish_reason, usage. Run it again "
                    "with the same --output to resume a killed job: finished rows are not redone. With --seed S "
                    "row N samples with seed S+N, whatever batch or worker it runs in.")
    p.add_argument("--input", required=True, help=".jsonl or .parquet (pyarrow), a path or an fsspec URL")
    p.add_argument("--output", required=True, help="results, JSON Lines (appended to; resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="start again: delete --output first")
    _model_args(p)
    _gen_args(p, chat=True)
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly --max-new-tokens per row, past EOS (for benchmarks: bench/batch_speed.py)")
    g = p.add_argument_group("scale")
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per worker (default 16)")
    g.add_argument("--workers", type=int, default=1, help="Ray actors, each holding one model (needs --ray)")
    g.add_argument("--ray", action="store_true", help="run on Ray Data (map_batches, one actor per worker)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray for the job)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_batch)


def _batch(a) -> int:
    from dataclasses import replace

    from aigckit.batch.runner import BatchArgs, run_batch

    params = replace(_params(a), ignore_eos=True) if a.ignore_eos else _params(a)
    args = BatchArgs(input=a.input, output=a.output, model=a.model, params=params, dtype=a.dtype,
                     quantize=a.quantize, kernels=a.kernels, threads=a.threads, max_batch=a.max_batch,
                     workers=a.workers, ray=a.ray, ray_address=a.ray_address, overwrite=a.overwrite)
    s = run_batch(args, progress=not a.quiet)
    if a.json:
        print(json.dumps(s))
    else:
        print(f"{s['written']} rows written ({s['errors']} errors), {s['done_before']} done before; "
              f"{s['rows_per_s']} rows/s, {s['tokens_per_s']} tokens/s -> {a.output}", file=sys.stderr)
    return 0
