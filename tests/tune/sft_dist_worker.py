"""Run by torchrun in tests/tune/test_sft_shards.py: ``sft_dist_worker.py JSON LOGDIR`` trains SFTArgs(**job) for
each job of the JSON list (``"stop_at"`` and ``"resume"`` as train()'s), logging the shard documents this rank reads
to LOGDIR/rank-R.json as [rows of the split, document] pairs."""

import json
import os
import sys
from pathlib import Path

from aigckit.tune import data
from aigckit.tune.sft import SFTArgs, SFTTask
from aigckit.tune.trainer import train

read: list[int] = []
example = data.ShardRows.example
data.ShardRows.example = lambda self, i: (read.append([len(self), i]), example(self, i))[1]
for kw in json.loads(sys.argv[1]):
    resume, stop_at = kw.pop("resume", False), kw.pop("stop_at", None)
    train(SFTTask(), SFTArgs(**kw), resume=resume, progress=False, stop_at=stop_at)
(Path(sys.argv[2]) / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(read))
