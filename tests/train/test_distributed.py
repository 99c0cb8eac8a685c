"""Data-parallel training under torchrun (gloo on the CPU): the shared mechanism of ``train/distributed.py``.

Tolerance: the toy family has no training noise, so a 2-rank run takes the same steps as a 1-process run with the
doubled batch; only the order of float sums differs (mean of two half-batch means vs one mean, an all_reduce): losses
and weights agree to 1e-5 (absolute; the values are O(1)).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aigckit.errors import AigcError
from aigckit.train import checkpoint as ck
from aigckit.train import distributed as dd
from aigckit.train import loop

from distutil import dist_env, torchrun

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """60 8x8 grey PNGs (54 for training), deterministic, no labels."""
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(d / f"{i:03d}.png")
    return d


def _env(tmp_path: Path) -> dict:
    return dist_env(tmp_path, HERE)


def _torchrun(tmp_path: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return torchrun(tmp_path, *argv, paths=(HERE,), timeout=timeout)


def _toy(tmp_path, folder, name, **kw):
    return dict(model="toy", out=str(tmp_path / name), data=str(folder), size="tiny", log_every=1, ckpt_every=3,
                sample_every=1000, grid_n=2, threads=1, **kw)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0)


@pytest.mark.slow
def test_two_ranks_match_one_with_double_batch_and_resume_across_world_sizes(tmp_path, folder, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setitem(loop.FAMILIES, "toy", "distfamily")
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    one = loop.train(loop.TrainArgs(**_toy(tmp_path, folder, "one", steps=6, batch_size=8)), progress=False)
    loop.train(loop.TrainArgs(**_toy(tmp_path, folder, "back", steps=3, batch_size=8)), progress=False)
    # one torchrun launch, two runs: "two" on 2 ranks x 4 for 3 steps (a checkpoint at 3); "back", 3 steps taken in
    # one process with a batch of 8, resumed on 2 ranks (4 each: the global batch stays 8) up to step 6
    jobs = [_toy(tmp_path, folder, "two", steps=3, batch_size=4),
            {**_toy(tmp_path, folder, "back", steps=6, batch_size=8), "resume": True}]
    r = _torchrun(tmp_path, str(HERE / "dist_worker.py"), json.dumps(jobs))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    cfg = ck.read_config(ck.latest_checkpoint(two))
    assert cfg["distributed"] == {"world_size": 2, "global_batch": 8} and cfg["train"]["batch_size"] == 4
    np.testing.assert_allclose(_losses(two), _losses(tmp_path / "one")[:3], atol=TOL, rtol=0)
    _close(_weights(ck.latest_checkpoint(two)), _weights(ck.list_checkpoints(tmp_path / "one")[0]))
    assert set(load_file(str(ck.latest_checkpoint(two) / "trainer_state.safetensors"))) >= {
        "rng.train", "rng.train.rank1", "rng.torch", "rng.torch.rank1"}
    state = json.loads((ck.latest_checkpoint(two) / "trainer_state.json").read_text())
    assert (state["images_seen"], state["data_epoch"], state["data_offset"]) == (24, 0, 24)
    # 1 -> 2 ranks
    back = ck.latest_checkpoint(tmp_path / "back")
    assert back.name == "step-000000006" and ck.read_config(back)["train"]["batch_size"] == 4
    _close(_weights(back), _weights(one))
    np.testing.assert_allclose(_losses(tmp_path / "back"), _losses(tmp_path / "one"), atol=TOL, rtol=0)
    # 54 images, global batch 8: 6 batches an epoch (the 6 left over are dropped); step 7 would open epoch 1
    state = json.loads((back / "trainer_state.json").read_text())
    assert (state["data_epoch"], state["data_offset"]) == (0, 48)
    # 2 -> 1 rank: the checkpoint of "two" resumed in this process takes the whole global batch
    resumed = loop.train(loop.TrainArgs(**_toy(tmp_path, folder, "two", steps=6, batch_size=4)), resume=True,
                         progress=False)
    assert ck.read_config(resumed)["train"]["batch_size"] == 8
    _close(_weights(resumed), _weights(one))
    np.testing.assert_allclose(_losses(two), _losses(tmp_path / "one"), atol=TOL, rtol=0)


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_stops_the_run_with_a_clear_error(tmp_path, folder, monkeypatch):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "aigckit",
           "image", "train", "--model", "vae", "--size", "tiny", "--data", str(folder), "--out", str(run),
           "--steps", "100000", "--batch-size", "4", "--ckpt-every", "2", "--sample-every", "100000", "--quiet",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not ck.list_checkpoints(run) and proc.poll() is None:
            time.sleep(0.1)
        assert ck.list_checkpoints(run), "no checkpoint written"
        victim = next(p for p in _children(proc.pid) if _rank_of(p) == 1)
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=90)  # must not hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "rank 0 of 2" in out and "another rank died or hung" in out, out[-3000:]
    # the checkpoint of the 2-rank run resumes in one process (global batch 8)
    last = ck.latest_checkpoint(run)
    step = int(last.name.split("-")[1])
    torch.set_num_threads(1)
    if "AIGC_HOME" not in os.environ:  # not os.environ itself: that leaked the path into every later test
        monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    final = loop.train(loop.TrainArgs(model="vae", out=str(run), steps=step + 1), resume=True, progress=False)
    assert final.name == f"step-{step + 1:09d}" and ck.read_config(final)["train"]["batch_size"] == 8


def test_sharded_sampler_sees_each_sample_once_per_epoch_and_keeps_its_place_in_samples():
    n, b = 50, 4
    ranks = [dd.ShardedSampler(n, b, seed=3, d=dd.Dist(rank=r, world_size=3)) for r in range(3)]
    seen = [torch.cat([s.next() for _ in range(ranks[0].batches_per_epoch)]) for s in ranks]
    allseen = torch.cat(seen)
    assert allseen.numel() == 48 and allseen.unique().numel() == 48  # 4 per epoch x 3 ranks x 4 batches; 2 dropped
    one = dd.ShardedSampler(n, b * 3, seed=3, d=dd.Dist())
    first = one.next()  # the global batch of one process is the ranks' slices in rank order
    assert torch.equal(first, torch.cat([s[:b] for s in seen]))
    # the position is in samples: 2 ranks x 6 then 1 rank x 12 continue from the same place
    two = dd.ShardedSampler(n, 6, seed=3, d=dd.Dist(rank=0, world_size=2))
    two.next()
    assert two.state() == {"data_epoch": 0, "data_offset": 12}
    cont = dd.ShardedSampler(n, 12, seed=3, d=dd.Dist(), **{"epoch": 0, "offset": 12})
    assert torch.equal(cont.next(), dd.epoch_order(n, 3, 0)[12:24])
    cont.next(), cont.next(), cont.next()  # offset 48 + 12 > 50: a new epoch
    assert cont.state() == {"data_epoch": 1, "data_offset": 12}
    with pytest.raises(AigcError, match="global batch"):
        dd.ShardedSampler(10, 6, seed=0, d=dd.Dist(rank=0, world_size=2))


def test_threads_and_seeds_per_rank(monkeypatch):
    assert dd.threads_per_rank(3, dd.Dist(world_size=2, local_world_size=2)) == 3
    assert dd.threads_per_rank(None, dd.Dist()) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert dd.threads_per_rank(None, dd.Dist(world_size=4, local_world_size=2)) == 4
    assert dd.threads_per_rank(None, dd.Dist(world_size=16, local_world_size=16)) == 1
    assert dd.rank_seed(5, 0) == 5
    assert len({dd.rank_seed(5, r) for r in range(8)}) == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(AigcError, match="RANK must be in 0..1"):
        dd.from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with dd.session() as d:
        assert d == dd.Dist() and not d.active
