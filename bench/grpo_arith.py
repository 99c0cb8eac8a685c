"""A short GRPO run on a verifiable task: SmolLM2-135M-Instruct adds two numbers (1..20) in a strict output format.

Writes a train and a held-out prompt set (disjoint problems), then runs ``aigc rl``. Two tasks (``--task``):

``equation`` (default; system "Answer with the equation a + b = c and nothing else."), rewards:
  ``format:EQUATION=0.5``  the reply is an equation "x + y = z" (any numbers: the format alone)
  ``exact-number``         its last number is the sum
  ``grpo_arith.py:equation``  the reply is exactly "a + b = c" with the question's operands and the right sum
  maximum 2.5; correctness is worth 2 of it, so the format cannot be bought with wrong sums.

``number`` (system "Reply with the number only."), rewards ``format:-?\\d+.*=0.5`` (starts with a number),
  ``format:-?\\d+`` (only a number), ``exact-number`` and ``brevity:3=0.5``; maximum 3.0. A lesson kept on purpose:
  the three format rewards outweigh the sum, and the policy learns to reply with a short *wrong* number within 25
  steps (reward hacking; see docs/TUNE.md).

LoRA on the top 10 of 30 layers only, so backward stops there. The held-out reward (greedy, before -> after) and
the samples are in RUN/summary.json, the per-step curves in RUN/metrics.jsonl.

    .venv/bin/python bench/grpo_arith.py --out /tmp/grpo-arith --steps 400 --minutes 28
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from aigckit.tune.rewards import completion_text

SYSTEM = {"equation": "Answer with the equation a + b = c and nothing else.", "number": "Reply with the number only."}
EQUATION = r"-?\d+ ?\+ ?-?\d+ ?= ?-?\d+\.?"
REWARDS = {
    "equation": [f"format:{EQUATION}=0.5", "exact-number", f"{Path(__file__).resolve()}:equation"],
    "number": [r"format:-?\d+.*=0.5", r"format:-?\d+", "exact-number", "brevity:3=0.5"],
}


def equation(prompts, completions, a, b, **_) -> list[float]:
    """1 if the completion is exactly "a + b = a+b" (spaces around the signs optional, a final full stop allowed)."""
    out = []
    for c, x, y in zip(completions, a, b):
        m = re.fullmatch(r"(-?\d+) ?\+ ?(-?\d+) ?= ?(-?\d+)\.?", completion_text(c).strip())
        out.append(1.0 if m and (int(m[1]), int(m[2]), int(m[3])) == (x, y, x + y) else 0.0)
    return out


def rows(pairs, task):
    return [{"prompt": [{"role": "system", "content": SYSTEM[task]},
                        {"role": "user", "content": f"What is {a} + {b}?"}],
             "answer": str(a + b), "a": a, "b": b} for a, b in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", choices=sorted(SYSTEM), default="equation")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=18)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--max-operand", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", default="3e-4")
    ap.add_argument("--num-generations", default="8")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `aigc rl` options")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(x, y) for x in range(1, a.max_operand + 1) for y in range(1, a.max_operand + 1)]
    random.Random(0).shuffle(pairs)
    held, train = pairs[:a.held_out], pairs[a.held_out:]
    for name, ps in (("train.jsonl", train), ("held.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows(ps, a.task)))
    cmd = [sys.executable, "-m", "aigckit", "rl", "--data", str(out / "train.jsonl"),
           "--eval-data", str(out / "held.jsonl"), "--out", str(out / "run"), "--steps", str(a.steps),
           "--minutes", str(a.minutes), *[x for r in REWARDS[a.task] for x in ("--reward", r)],
           "--num-generations", a.num_generations, "--batch-size", "2", "--max-new-tokens", "12",
           "--lr", a.lr, "--lora-rank", "16", "--lora-alpha", "32", "--beta", "0.04", "--warmup", "2",
           "--target-modules", r"re:model\.layers\.(2\d)\..*", "--ckpt-every", "5", "--threads", str(a.threads),
           "--json", *a.extra]
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    s = json.loads((out / "run" / "summary.json").read_text())
    print(json.dumps({"before": s["before"], "after": s["after"], "train_time_s": s["train_time_s"],
                      "samples_before": s.get("samples_before"), "samples_after": s.get("samples_after")}, indent=2))


if __name__ == "__main__":
    main()
