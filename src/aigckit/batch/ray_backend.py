"""The rows on Ray: Ray Data ``map_batches`` with a pool of ``workers`` actors, each holding one model and its
continuous-batching scheduler; the driver writes results as Ray hands batches back (streaming execution).

Without ``--ray-address`` (or ``RAY_ADDRESS``) a local Ray is started for the job with ``workers x threads`` CPUs;
with one, the job goes to that cluster (every node needs aigckit and the model in its store). Each actor gets
``threads`` CPUs (``num_cpus``) and sets torch to that many threads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from aigckit.batch.rows import Row
from aigckit.errors import AigcError

ROWS_PER_TASK = 16  # rows per map_batches call: the unit of work (and of progress) an actor takes at a time


class _Worker:
    """A Ray actor: one model, one scheduler, many batches."""

    def __init__(self, model_options: dict[str, Any], params: dict[str, Any], max_batch: int) -> None:
        import torch

        from aigckit.batch.generate import BatchGenerator
        from aigckit.text.lm import load_lm
        from aigckit.text.params import GenerationParams

        self.threads = model_options.get("threads") or 1
        torch.set_num_threads(self.threads)
        self.gen = BatchGenerator(load_lm(**model_options), GenerationParams(**params), max_batch=max_batch)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        import torch

        from aigckit.text.kernels.gemm import set_num_threads

        if torch.get_num_threads() != self.threads:  # OpenMP settings are per thread: Ray may call from another
            set_num_threads(self.threads)
        rows = [Row.from_json(s) for s in batch["row"]]
        return {"result": [json.dumps(r, ensure_ascii=False) for r in self.gen.run(rows)]}


def _params_dict(params) -> dict[str, Any]:
    if params.processors:
        raise AigcError("logits processors cannot be sent to Ray workers", param="processors")
    from dataclasses import asdict

    d = asdict(params)
    d.pop("processors")
    return d


def run_on_ray(todo: list[Row], args):
    try:
        import ray
    except ImportError:
        raise AigcError("--ray needs Ray: pip install 'aigckit[ray]' (or 'ray[data]')", param="ray") from None
    threads = args.threads or 1
    started = False
    if not ray.is_initialized():
        address = args.ray_address or os.environ.get("RAY_ADDRESS")
        env = {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "AIGC_HOME", "AIGC_NO_NUMBA")}
        env["OMP_NUM_THREADS"] = env["NUMBA_NUM_THREADS"] = str(threads)
        here = str(Path(__file__).resolve().parents[2])  # this aigckit, for workers of a local Ray
        env["PYTHONPATH"] = os.pathsep.join([here, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False,
                              "logging_level": "ERROR"}
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=args.workers * threads, **kw)
        started = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.verbose_stats_logs = False
        ds = ray.data.from_items([{"row": r.to_json()} for r in todo])
        out = ds.map_batches(_Worker, fn_constructor_kwargs={"model_options": args.model_options(),
                                                             "params": _params_dict(args.params),
                                                             "max_batch": args.max_batch},
                             batch_size=min(ROWS_PER_TASK, max(1, len(todo) // args.workers)),
                             compute=ray.data.ActorPoolStrategy(size=args.workers), num_cpus=threads,
                             batch_format="numpy")
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for s in batch["result"]:
                yield json.loads(s)
    finally:
        if started:
            ray.shutdown()
