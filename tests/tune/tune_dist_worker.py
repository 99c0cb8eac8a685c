"""Run by torchrun in tests/tune/test_dist_tuners.py: ``tune_dist_worker.py JSON`` trains each job of the JSON list,
``{"task": "dpo" | "rl", "resume": bool, "stop_at": int | None, **the task's args}`` (``resume`` and ``stop_at`` as
train()'s), one after the other in the same job."""

import json
import sys

from aigckit.tune.dpo import DPOArgs, DPOTask
from aigckit.tune.grpo import RLArgs, RLTask
from aigckit.tune.trainer import train

TASKS = {"dpo": (DPOTask, DPOArgs), "rl": (RLTask, RLArgs)}
for kw in json.loads(sys.argv[1]):
    task, cls = TASKS[kw.pop("task")]
    resume, stop_at = kw.pop("resume", False), kw.pop("stop_at", None)
    train(task(), cls(**kw), resume=resume, progress=False, stop_at=stop_at)
