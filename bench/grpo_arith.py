"""A short GRPO run on a verifiable task: SmolLM2-135M-Instruct answers small additions with the number alone.

Writes a train and a held-out prompt set (disjoint problems), then runs ``aigc rl`` with three built-in rewards:
``format:-?\\d+.*`` at weight 0.5 (the reply starts with a number: a signal the base model already gets sometimes),
``format:-?\\d+`` (the reply is only a number) and ``exact-number`` (its last number is the sum); maximum 2.5. LoRA on the top 10 of 30 layers only, so backward stops there. The held-out reward
(greedy, before -> after) and the samples are in RUN/summary.json, the per-step curves in RUN/metrics.jsonl.

    nice -n 10 .venv/bin/python bench/grpo_arith.py --out /tmp/grpo-arith --steps 40
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

SYSTEM = "Reply with the number only."


def rows(pairs):
    return [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}],
             "answer": str(a + b)} for a, b in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=18)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--max-operand", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `aigc rl` options")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(x, y) for x in range(1, a.max_operand + 1) for y in range(1, a.max_operand + 1)]
    random.Random(0).shuffle(pairs)
    held, train = pairs[:a.held_out], pairs[a.held_out:]
    for name, ps in (("train.jsonl", train), ("held.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows(ps)))
    cmd = [sys.executable, "-m", "aigckit", "rl", "--data", str(out / "train.jsonl"),
           "--eval-data", str(out / "held.jsonl"), "--out", str(out / "run"), "--steps", str(a.steps),
           "--minutes", str(a.minutes), "--reward", r"format:-?\d+.*=0.5", "--reward", r"format:-?\d+",
           "--reward", "exact-number", "--num-generations", "4", "--batch-size", "2", "--max-new-tokens", "12",
           "--lr", "1e-3", "--lora-rank", "16", "--lora-alpha", "32", "--beta", "0.04", "--warmup", "2",
           "--target-modules", r"re:model\.layers\.(2\d)\..*", "--ckpt-every", "5", "--threads", str(a.threads),
           "--json", *a.extra]
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    s = json.loads((out / "run" / "summary.json").read_text())
    print(json.dumps({"before": s["before"], "after": s["after"], "train_time_s": s["train_time_s"],
                      "samples_before": s.get("samples_before"), "samples_after": s.get("samples_after")}, indent=2))


if __name__ == "__main__":
    main()
