"""``run_batch``: read the rows, skip the ones already in the output, generate the rest (here or on Ray), append
each result as it finishes. See ``docs/BATCH.md``."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from aigckit.batch.rows import Row, done_ids, read_rows
from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams


@dataclass
class BatchArgs:
    input: str
    output: str
    model: str | None = None  # load_lm's: store name, .gguf, HF directory (default: smollm2-135m-instruct)
    params: GenerationParams = field(default_factory=GenerationParams)
    dtype: str = "float32"
    quantize: str | None = None
    kernels: str = "auto"
    threads: int | None = None  # per worker
    max_batch: int = 16  # sequences decoded together per worker
    workers: int = 1  # Ray actors (each holds one model); 1 without Ray
    ray: bool = False
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the job
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise AigcError(f"workers must be >= 1, got {self.workers}", param="workers")
        if self.workers > 1 and not self.ray:
            raise AigcError("workers > 1 needs --ray (without it the job runs in one process)", param="workers")
        if self.max_batch < 1:
            raise AigcError(f"max_batch must be >= 1, got {self.max_batch}", param="max_batch")
        if self.threads is not None and self.threads < 1:
            raise AigcError(f"threads must be >= 1, got {self.threads}", param="threads")

    def model_options(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "quantize": self.quantize, "kernels": self.kernels,
                "threads": self.threads}


def run_batch(args: BatchArgs, *, progress: bool = True) -> dict[str, Any]:
    """Generate every row of ``args.input`` not yet in ``args.output``; returns a summary."""
    from tqdm import tqdm

    rows = read_rows(args.input)
    if args.overwrite and os.path.exists(args.output):
        os.remove(args.output)
    done = done_ids(args.output)
    unknown = done - {r.id for r in rows}
    if unknown:
        raise AigcError(f"{args.output} holds results for ids not in {args.input} (e.g. {sorted(unknown)[0]!r}): "
                        "another job's output? choose another --output or pass --overwrite", param="output")
    todo = [r for r in rows if r.id not in done]
    if done and progress:
        print(f"resuming: {len(done)} of {len(rows)} rows already in {args.output}", file=sys.stderr)
    summary: dict[str, Any] = {"rows": len(rows), "done_before": len(done), "written": 0, "errors": 0,
                               "completion_tokens": 0, "backend": "ray" if args.ray else "local",
                               "workers": args.workers}
    t0 = time.perf_counter()
    results = _results(args, todo)
    bar = tqdm(total=len(rows), initial=len(done), desc="batch", unit="row", disable=not progress,
               dynamic_ncols=True)
    try:
        with open(args.output, "a", encoding="utf-8") as out:
            for res in results:
                out.write(json.dumps(res, ensure_ascii=False) + "\n")  # one whole line, then flushed
                out.flush()
                summary["written"] += 1
                summary["errors"] += "error" in res
                summary["completion_tokens"] += res.get("usage", {}).get("completion_tokens", 0)
                bar.update(1)
            os.fsync(out.fileno())
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close:
            close()
    dt = time.perf_counter() - t0
    summary.update(seconds=round(dt, 3), rows_per_s=round(summary["written"] / dt, 3) if dt > 0 else None,
                   tokens_per_s=round(summary["completion_tokens"] / dt, 2) if dt > 0 else None)
    return summary


def _results(args: BatchArgs, todo: list[Row]):
    if not todo:
        return iter(())
    if args.ray:
        from aigckit.batch.ray_backend import run_on_ray

        return run_on_ray(todo, args)
    return _local(args, todo)


def _local(args: BatchArgs, todo: list[Row]):
    from aigckit.batch.generate import BatchGenerator
    from aigckit.text.lm import load_lm

    lm = load_lm(**args.model_options())
    gen = BatchGenerator(lm, args.params, max_batch=args.max_batch)
    try:
        yield from gen.run(todo)
    finally:
        gen.close()
