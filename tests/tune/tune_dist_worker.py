"""Run by torchrun in tests/tune/test_dist_tuners.py: ``tune_dist_worker.py JSON`` trains each job of the JSON list,
``{"task": "dpo" | "rl", "resume": bool, "stop_at": int | None, **the task's args}`` (``resume`` and ``stop_at`` as
train()'s), one after the other in the same job. ``"skew": true``: rank 1 nudges its gradients after every step
(ranks that no longer agree: the loop must stop at the next checkpoint)."""

import json
import os
import sys

from aigckit.tune.dpo import DPOArgs, DPOTask
from aigckit.tune.grpo import RLArgs, RLTask
from aigckit.tune.trainer import train

TASKS = {"dpo": (DPOTask, DPOArgs), "rl": (RLTask, RLArgs)}
for kw in json.loads(sys.argv[1]):
    task, cls = TASKS[kw.pop("task")]
    resume, stop_at, skew = kw.pop("resume", False), kw.pop("stop_at", None), kw.pop("skew", False)
    t = task()
    if skew and os.environ["RANK"] == "1":
        step = t.step

        def skewed(lm, model, k, args):
            out = step(lm, model, k, args)
            next(p for p in model.parameters() if p.grad is not None).grad.add_(1e-3)
            return out
        t.step = skewed
    train(t, cls(**kw), resume=resume, progress=False, stop_at=stop_at)
