"""SFT from memory-mapped token shards (``aigc data tokenize --sft`` -> ``aigc finetune --data FOLDER``): the same
run as from the JSONL the shards came from, rows read from the memory map on demand, and data-parallel under
torchrun (gloo), each rank reading its own rows.

Tolerance of the 2-rank comparison: the tiny model has no dropout here, so 2 ranks x 2 rows take the same steps as
one process with 4 rows; only the order of float sums differs (two half-batch gradients averaged by an all_reduce):
losses and LoRA weights agree to 1e-5 (absolute; values are O(1) and O(0.1))."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aigckit.cli import main
from aigckit.errors import AigcError
from aigckit.text.lm import load_lm
from aigckit.train import checkpoint as ck
from aigckit.tune import data
from aigckit.tune.sft import SFTArgs, SFTTask
from aigckit.tune.trainer import train

from distutil import torchrun

HERE = Path(__file__).parent
TOL = 1e-5
SAME = 1e-5  # the same run from JSONL and from shards: the same examples (checked exactly), so the same steps; the
# float results agree to ~1e-7, not bit for bit, because the first training run in a process rounds differently
# (the JSONL run repeated in one process differs from itself by as much)


def _tokenize(src: Path | str, out: Path, model: Path, *extra: str) -> Path:
    assert main(["data", "tokenize", str(src), "--sft", "--out", str(out), "--model", str(model), "--quiet",
                 *extra]) == 0
    return out


def _args(data, out, model, **kw) -> SFTArgs:
    base = dict(data=str(data), out=str(out), model=str(model), steps=4, lr=5e-3, batch_size=4, lora_rank=4,
                ckpt_every=3, eval_frac=0.25, warmup=1, threads=1)
    return SFTArgs(**{**base, **kw})


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _adapter(run: Path, ckpt: str | None = None) -> dict[str, torch.Tensor]:
    if ckpt:
        return load_file(str(run / "checkpoints" / ckpt / "model.safetensors"))
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_shards_carry_the_sft_tokens_and_masks(tiny_chat_dir, sft_file, tmp_path, capsys):
    fsspec.filesystem("memory").pipe("/sft/rows.jsonl", sft_file.read_bytes())  # any fsspec URL
    shards = _tokenize("memory://sft/rows.jsonl", tmp_path / "s", tiny_chat_dir, "--shard-tokens", "64")  # 3+ shards
    capsys.readouterr()
    tok = load_lm(tiny_chat_dir, kernels="torch").tokenizer
    rows = data.read_jsonl(sft_file, "sft")
    assert [r.data for r in data.read_jsonl("memory://sft/rows.jsonl", "sft")] == [r.data for r in rows]
    ts = data.open_sft_shards(str(shards), tok)
    assert ts.num_docs == len(rows) and len(ts.index["shards"]) > 2 and ts.index["kind"] == "sft"
    for i, r in enumerate(rows):
        e = data.sft_example(tok, r)
        assert ts.doc(i).tolist() == e.ids
        assert ts.doc_mask(i).tolist() == [lab != data.IGNORE for lab in e.labels]
    assert main(["data", "info", str(shards), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 2 and info["mask"] is True and info["verified"]
    assert main(["finetune", "--model", str(tiny_chat_dir), "--data", f"file://{shards}", "--out",
                 str(tmp_path / "cli"), "--steps", "1", "--lora-rank", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    # shards of format 1 (no version, no masks) are refused with a message that says what to do
    index = json.loads((shards / "index.json").read_text())
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({**index, "format": "aigckit-token-shards/1"}))
    with pytest.raises(AigcError, match="format 1 .*tokenise the corpus again"):
        data.open_sft_shards(str(tmp_path / "old"), tok)
    rc = main(["finetune", "--model", str(tiny_chat_dir), "--data", str(tmp_path / "old"), "--out",
               str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "format 1" in err and len(err.strip().splitlines()) == 1
    # another tokenizer's shards
    shutil.copytree(shards, tmp_path / "v")
    (tmp_path / "v" / "index.json").write_text(json.dumps({**index, "vocab_size": 7}))
    with pytest.raises(AigcError, match="vocabulary of 7"):
        data.open_sft_shards(str(tmp_path / "v"), tok)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_from_shards_is_the_run_from_jsonl(tiny_chat_dir, sft_file, tmp_path, packing):
    shards = _tokenize(sft_file, tmp_path / "s", tiny_chat_dir)
    kw = dict(packing=True, max_len=24, eval_frac=0.0) if packing else {}
    # the same examples (ids and labels), in the same training / held-out split
    lm = load_lm(tiny_chat_dir, kernels="torch")
    ta, tb = SFTTask(), SFTTask()
    ta.prepare(lm, _args(sft_file, tmp_path / "x", tiny_chat_dir, **kw))
    tb.prepare(lm, _args(f"file://{shards}", tmp_path / "x", tiny_chat_dir, **kw))
    for xa, xb in ((ta.train, tb.train), (ta.held, tb.held)):
        assert [(e.ids, e.labels) for e in xa] == [(e.ids, e.labels) for e in xb[:]]
    # and so the same run (same seed): the loss curve, held-out loss and adapter
    a = train(SFTTask(), _args(sft_file, tmp_path / "a", tiny_chat_dir, **kw), progress=False)
    b = train(SFTTask(), _args(f"file://{shards}", tmp_path / "b", tiny_chat_dir, **kw), progress=False)
    assert len(_losses(tmp_path / "a")) == 4 and a["tokens_seen"] == b["tokens_seen"]
    np.testing.assert_allclose(_losses(tmp_path / "b"), _losses(tmp_path / "a"), atol=SAME, rtol=0)
    for k in a["after"]:
        assert abs(a["after"][k] - b["after"][k]) < SAME and abs(a["before"][k] - b["before"][k]) < SAME
    wa, wb = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=SAME, rtol=0)


class _Spy:
    """Stands in for one memory map and records the token ranges read from it."""

    def __init__(self, mm: np.memmap, log: list) -> None:
        self.mm, self.log, self.dtype = mm, log, mm.dtype

    def __getitem__(self, s: slice):
        self.log.append((s.start, s.stop))
        return self.mm[s]


def test_rows_come_from_the_memory_map_not_a_copy(tiny_chat_dir, sft_file, tmp_path):
    shards = _tokenize(sft_file, tmp_path / "s", tiny_chat_dir)
    lm = load_lm(tiny_chat_dir, kernels="torch")
    task = SFTTask()
    args = _args(f"file://{shards}", tmp_path / "r", tiny_chat_dir, batch_size=2, eval_frac=0.0)
    task.prepare(lm, args)
    ts = task.train.shards
    assert isinstance(task.train, data.ShardRows)
    assert all(type(m) is np.memmap for m in ts._bins + ts._masks)  # mapped, never loaded into an ndarray
    reads: list = []
    ts._bins = [_Spy(m, reads) for m in ts._bins]
    ts._masks = [_Spy(m, reads) for m in ts._masks]
    task._micro_batches(0, args)
    docs = data.rank_rows(ts.num_docs, 0, 2, args.seed)
    spans = sorted(ts.doc_span(i) for i in docs)
    # exactly the two documents' tokens, once for the ids and once for the mask, nothing else
    assert sorted(reads) == sorted(spans * 2) and sum(b - a for a, b in reads) < len(ts)


@pytest.mark.slow
def test_two_ranks_read_disjoint_rows_and_match_one_process(tiny_chat_dir, sft_file, tmp_path, monkeypatch):
    shards = _tokenize(sft_file, tmp_path / "s", tiny_chat_dir)
    common = dict(steps=5, eval_frac=0.25, warmup=0)  # 21 training rows, 7 held out
    read: list[int] = []
    example = data.ShardRows.example
    monkeypatch.setattr(data.ShardRows, "example",
                        lambda self, i: (read.append(i) if len(self) == 21 else None, example(self, i))[1])
    one = train(SFTTask(), _args(shards, tmp_path / "one", tiny_chat_dir, **common), progress=False)
    monkeypatch.setattr(data.ShardRows, "example", example)
    # 2 ranks x 2 rows for 3 of the 5 steps (a checkpoint at 3), then resumed in this process with 4 rows a step
    job = {**vars(_args(shards, tmp_path / "two", tiny_chat_dir, batch_size=2, **common)), "stop_at": 3}
    logs = tmp_path / "logs"
    logs.mkdir()
    r = torchrun(tmp_path, str(HERE / "sft_dist_worker.py"), json.dumps([job]), str(logs), paths=(HERE,))
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [json.loads((logs / f"rank-{k}.json").read_text()) for k in (0, 1)]
    ranks = [[i for n, i in log if n == 21] for log in logged]  # the training rows (held-out ones: n == 7)
    held = [[i for n, i in log if n == 7] for log in logged]
    assert sorted(held[0] + held[1]) == sorted(set(held[0] + held[1])) and len(held[0] + held[1]) == 7
    assert len(ranks[0]) == len(ranks[1]) == 6 and not set(ranks[0]) & set(ranks[1])
    for s in range(3):  # each step's global batch is the one process's batch, rank 0's slice first
        assert ranks[0][2 * s:2 * s + 2] + ranks[1][2 * s:2 * s + 2] == read[4 * s:4 * s + 4]
    two = tmp_path / "two"
    cfg = ck.read_config(ck.latest_checkpoint(two))
    assert cfg["distributed"] == {"world_size": 2, "global_batch": 4} and cfg["args"]["batch_size"] == 2
    state = json.loads((ck.latest_checkpoint(two) / "trainer_state.json").read_text())
    assert state["data_samples"] == 12
    np.testing.assert_allclose(_losses(two), _losses(tmp_path / "one")[:3], atol=TOL, rtol=0)
    before = json.loads((two / "summary.json").read_text())["before"]  # the held-out loss, evaluated in halves
    assert abs(before["eval_loss"] - one["before"]["eval_loss"]) < TOL
    wa, wb = _adapter(two, "step-000000003"), _adapter(tmp_path / "one", "step-000000003")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=TOL, rtol=0)
    # 2 ranks -> 1: the global batch of 4 is kept, and the run ends where the one-process run did
    after = train(SFTTask(), _args(shards, two, tiny_chat_dir, **common), resume=True, progress=False)
    assert ck.read_config(ck.latest_checkpoint(two))["args"]["batch_size"] == 4
    assert abs(after["after"]["eval_loss"] - one["after"]["eval_loss"]) < TOL
    np.testing.assert_allclose(_losses(two), _losses(tmp_path / "one"), atol=TOL, rtol=0)
    wa, wb = _adapter(two), _adapter(tmp_path / "one")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=TOL, rtol=0)


def test_a_task_without_distributed_refuses_more_than_one_rank(monkeypatch, tmp_path):
    from aigckit.train import distributed as dd
    from aigckit.tune.dpo import DPOArgs, DPOTask
    from aigckit.tune.grpo import RLTask

    class Later(DPOTask):  # a task that has not declared it runs data-parallel
        distributed = False
        kind = "later"

    assert DPOTask.distributed and RLTask.distributed and SFTTask.distributed  # every task here runs on N ranks
    monkeypatch.setattr(dd, "session", lambda device="cpu": _fake_session(dd.Dist(rank=0, world_size=2)))
    with pytest.raises(AigcError, match="later does not run data-parallel"):
        train(Later(), DPOArgs(data="x.jsonl", out=str(tmp_path / "d")), progress=False)


def _fake_session(d):
    import contextlib

    @contextlib.contextmanager
    def cm():
        yield d
    return cm()
