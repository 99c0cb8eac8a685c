"""Copy a trained run's newest checkpoint into a built-in model folder (src/aigckit/multimodal/builtin/NAME):
config.json + model.safetensors (the EMA weights when the run has them) + checksums.json + TRAINING.md.

    python docs/multimodal/export_builtin.py RUN NAME "training command" [notes]
"""

import json
import shutil
import sys
from pathlib import Path

from aigckit import checkpoints as ck

run, name, command = sys.argv[1], sys.argv[2], sys.argv[3]
notes = sys.argv[4] if len(sys.argv) > 4 else ""
src = ck.latest_checkpoint(run)
dest = Path(__file__).resolve().parents[2] / "src" / "aigckit" / "multimodal" / "builtin" / name
if dest.exists():
    shutil.rmtree(dest)
dest.mkdir(parents=True)
cfg = json.loads((src / "config.json").read_text())
(dest / "config.json").write_text(json.dumps(cfg, indent=2))
weights = src / "ema.safetensors" if (src / "ema.safetensors").exists() else src / "model.safetensors"
shutil.copyfile(weights, dest / "model.safetensors")
metrics = Path(run) / "metrics.jsonl"
last = metrics.read_text().strip().splitlines()[-1] if metrics.exists() else "{}"
(dest / "TRAINING.md").write_text(
    f"# {name}\n\nTrained with (from a clean checkout, on a shared 2-core AMD EPYC, AVX2, nice -n 10):\n\n"
    f"```bash\n{command}\n```\n\nData: {cfg.get('data', {}).get('name') or cfg['train'].get('data')} "
    f"(see src/aigckit/multimodal/). Weights: {weights.name} of {src.name}.\n\nLast metrics row: `{last}`\n\n{notes}\n")
(dest / "checksums.json").write_text(json.dumps(ck.checksums(dest, ["config.json", "model.safetensors"]), indent=2))
print(dest, sum(f.stat().st_size for f in dest.iterdir()))
