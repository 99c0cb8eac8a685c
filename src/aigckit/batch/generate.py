"""Rows through the continuous-batching scheduler in this process: results come back as each row finishes.

``max_batch`` sequences decode together; up to ``2 * max_batch`` rows are in flight (waiting or running), each
drained by a thread of a small pool (the scheduler's one worker thread does the computing). A row that fails
(its prompt is too long, a bad per-row option) yields an ``error`` result and the batch goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterable, Iterator
from typing import Any

from aigckit.batch.rows import Row
from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams


def row_params(base: GenerationParams, row: Row) -> GenerationParams:
    """The command's parameters with the row's own options; with a base seed, row N samples with seed + N, so a
    row's text depends on neither the batch it ran in nor the worker (resume and Ray give the same rows)."""
    opts = dict(row.options)
    if "seed" not in opts and base.seed is not None:
        opts["seed"] = base.seed + row.index
    return GenerationParams.make(base, **opts) if opts else base


class BatchGenerator:
    """One model, one scheduler; ``run(rows)`` yields a result dict per row as rows finish."""

    def __init__(self, lm, params: GenerationParams, *, max_batch: int = 16) -> None:
        from aigckit.text.scheduler import Scheduler

        if params.num_beams > 1 or params.num_return_sequences > 1:
            raise AigcError("batch generation makes one sampled sequence per row (num_beams = "
                            "num_return_sequences = 1)", param="num_beams")
        self.lm, self.params, self.max_batch = lm, params, max_batch
        self.scheduler = Scheduler(lm, max_batch=max_batch, max_queue=2 * max_batch)

    def close(self) -> None:
        self.scheduler.close()

    def _one(self, row: Row) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            params = row_params(self.params, row)
            ids = self.lm.chat_prompt(row.messages) if row.messages is not None else self.lm.prompt_ids(row.prompt)
            text, n, finish = [], 0, None
            for ev in self.scheduler.submit(ids, params):
                text.append(ev.text)
                n += ev.token_id is not None
                finish = ev.finish_reason or finish
        except Exception as e:  # noqa: BLE001  (one row's failure is that row's result)
            return {"id": row.id, "error": {"type": type(e).__name__, "message": str(e).strip().splitlines()[0]
                                            if str(e).strip() else type(e).__name__,
                                            "param": getattr(e, "param", None)}}
        return {"id": row.id, "text": "".join(text), "finish_reason": finish,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
                "model": self.lm.name, "seconds": round(time.perf_counter() - t0, 4)}

    def run(self, rows: Iterable[Row]) -> Iterator[dict[str, Any]]:
        window = 2 * self.max_batch
        it = iter(rows)
        with cf.ThreadPoolExecutor(max_workers=window, thread_name_prefix="aigc-batch") as pool:
            pending = set()
            for row in it:
                pending.add(pool.submit(self._one, row))
                if len(pending) >= window:
                    break
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.add(pool.submit(self._one, nxt))
