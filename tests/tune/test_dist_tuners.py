"""DPO and GRPO data-parallel under torchrun (2 gloo processes on this machine, rendezvous on a free port): the
losses, held-out metrics and LoRA weights of 2 ranks x B rows equal one process's with 2B rows, and checkpoints
resume across world sizes (2 ranks -> 1 and 1 -> 2), ending where the one-process run ends.

Tolerance: the tiny model has no dropout, so both runs take the same steps on the same rows (RL: the same prompts
and, with a seed per completion, the same sampled tokens); only the order of float sums differs (half batches, an
all_reduce of two half gradients, logits of a smaller batch): losses and metrics agree to 1e-5 (absolute; values
are O(1)), LoRA weights (O(0.1)) to 1e-4: Adam divides each gradient by its running RMS, which in the first steps
turns rounding differences of tiny gradients into weight differences of up to ~1e-5 (1.2e-5 seen on an AVX-512
CPU, whose 16-lane reductions sum in another order than AVX2's). A wrong normalisation (a rank dividing by its own count instead of the
global one) is off by far more (checked by hand when these tests were written: 1e-3 and up). Ranks whose adapters
drift apart (rank 1 nudging its gradients) stop the run at the next checkpoint with an error naming it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aigckit.train import checkpoint as ck
from aigckit.tune.dpo import DPOArgs, DPOTask
from aigckit.tune.grpo import RLArgs, RLTask
from aigckit.tune.trainer import train
from distutil import torchrun
from tuneutil import words, write_jsonl

HERE = Path(__file__).parent
TOL = 1e-5
WEIGHT_TOL = 1e-4


def _rows(run: Path, key: str) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def _adapter(run: Path, ckpt: str | None = None) -> dict[str, torch.Tensor]:
    if ckpt:
        return load_file(str(run / "checkpoints" / ckpt / "model.safetensors"))
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 1e-3 for k, v in a.items()
                                         if "lora_B" in k or k.endswith(".B"))  # trained, not the zero init
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=WEIGHT_TOL, rtol=0)


def _same_metrics(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert len(a) == len(b) and a
    for k in keys:
        np.testing.assert_allclose([r[k] for r in a], [r[k] for r in b], atol=TOL, rtol=0, err_msg=k)


def _check(tmp_path: Path, task, make_args, train_keys: tuple[str, ...], eval_keys: tuple[str, ...],
           skew: bool = False) -> None:
    """One process with 4 rows a step; 2 ranks x 2 stopped at step 2 then resumed on 1; 1 process x 4 stopped at
    step 2 then resumed on 2 ranks: the same losses, held-out metrics and adapters. ``skew``: a last job in the same
    launch whose rank 1 nudges its gradients must stop at its first checkpoint, naming the cause."""
    one = train(task(), make_args(tmp_path / "one", batch_size=4), progress=False)
    train(task(), make_args(tmp_path / "p1", batch_size=4), progress=False, stop_at=2)
    kind = "dpo" if task is DPOTask else "rl"
    jobs = [{"task": kind, **vars(make_args(tmp_path / "two", batch_size=2)), "stop_at": 2},
            {"task": kind, **vars(make_args(tmp_path / "p1", batch_size=2)), "resume": True}]
    if skew:
        jobs.append({"task": kind, **vars(make_args(tmp_path / "skew", batch_size=2)), "skew": True})
    r = torchrun(tmp_path, str(HERE / "tune_dist_worker.py"), json.dumps(jobs), paths=(HERE,))
    if skew:
        assert r.returncode != 0 and "the LoRA weights differ between ranks" in r.stderr, r.stderr[-3000:]
        assert not ck.list_checkpoints(tmp_path / "skew")  # stopped before writing the diverged weights
        assert (tmp_path / "p1" / "summary.json").exists() and "after" in json.loads((tmp_path / "p1" /
                                                                                       "summary.json").read_text())
    else:
        assert r.returncode == 0, r.stderr[-3000:]
    two, p1, ref = tmp_path / "two", tmp_path / "p1", tmp_path / "one"
    cfg = ck.read_config(ck.latest_checkpoint(two))
    assert cfg["distributed"] == {"world_size": 2, "global_batch": 4} and cfg["args"]["batch_size"] == 2
    _same_metrics(_rows(two, "loss"), _rows(ref, "loss")[:2], train_keys)
    _same_weights(_adapter(two, "step-000000002"), _adapter(ref, "step-000000002"))
    before = json.loads((two / "summary.json").read_text())["before"]  # held-out metrics, evaluated in halves
    _same_metrics([before], [one["before"]], eval_keys)
    # 1 -> 2: the one-process checkpoint ran on to the end on 2 ranks (2 prompts or pairs each)
    assert ck.read_config(ck.latest_checkpoint(p1))["args"]["batch_size"] == 2
    _same_metrics(_rows(p1, "loss"), _rows(ref, "loss"), train_keys)
    _same_metrics([json.loads((p1 / "summary.json").read_text())["after"]], [one["after"]], eval_keys)
    _same_weights(_adapter(p1), _adapter(ref))
    # 2 -> 1: the global batch of 4 is kept, and the run ends where the one-process run did
    after = train(task(), make_args(two, batch_size=4), resume=True, progress=False)
    assert ck.read_config(ck.latest_checkpoint(two))["args"]["batch_size"] == 4
    _same_metrics(_rows(two, "loss"), _rows(ref, "loss"), train_keys)
    _same_metrics([after["after"]], [one["after"]], eval_keys)
    _same_weights(_adapter(two), _adapter(ref))


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = [rng.randint(10, 40) for _ in range(4)]
        rows.append({"prompt": " ".join(f"w{x}" for x in q), "chosen": " ".join(f"w{x + 40}" for x in q[:3]),
                     "rejected": words(rng, rng.randint(3, 7), 10, 30)})  # ragged: padding differs by batch
    return rows


@pytest.mark.slow
def test_dpo_two_ranks_equal_one_process_and_resume_across_world_sizes(tiny_chat_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", _pairs(16, 0))
    held = write_jsonl(tmp_path / "h.jsonl", _pairs(6, 1))

    def make_args(out, **kw):
        return DPOArgs(data=str(data), eval_data=str(held), out=str(out), model=str(tiny_chat_dir), steps=4,
                       lr=2e-2, lora_rank=4, beta=0.5, ckpt_every=2, threads=1, **kw)

    _check(tmp_path, DPOTask, make_args, ("loss", "reward_margin", "reward_accuracy", "grad_norm"),
           ("eval_loss", "eval_reward_accuracy", "eval_preference_accuracy"), skew=True)


@pytest.mark.slow
def test_grpo_two_ranks_equal_one_process_and_resume_across_world_sizes(tiny_llama_dir, tmp_path):
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": words(rng, rng.randint(2, 5))} for _ in range(16)])
    held = write_jsonl(tmp_path / "h.jsonl", [{"prompt": words(rng, 4)} for _ in range(5)])

    def make_args(out, **kw):
        return RLArgs(data=str(data), eval_data=str(held), out=str(out), model=str(tiny_llama_dir), steps=4,
                      lr=3e-2, num_generations=4, max_new_tokens=6, lora_rank=4, max_len=64, beta=0.04,
                      rewards=["tuneutil:low_ids_reward"], eval_generations=2, ckpt_every=2, threads=1, **kw)

    _check(tmp_path, RLTask, make_args, ("loss", "reward", "reward_std", "zero_std_frac", "kl", "completion_len",
                                         "reward/low_ids_reward", "reward_std/low_ids_reward", "grad_norm"),
           ("eval_reward", "eval_reward/low_ids_reward"))
