"""Run by torchrun in the data-parallel tests: ``dist_worker.py JSON`` trains TrainArgs(**job) for each job of the
JSON list in turn (the toy family registered; ``"resume": true`` resumes): one launch, several runs."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from aigckit.train import loop  # noqa: E402

loop.FAMILIES["toy"] = "distfamily"
for kw in json.loads(sys.argv[1]):
    resume = kw.pop("resume", False)
    loop.train(loop.TrainArgs(**kw), resume=resume, progress=False)
