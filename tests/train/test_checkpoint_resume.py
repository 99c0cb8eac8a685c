import hashlib
import json
from pathlib import Path

import pytest
import torch

from aigckit.errors import CorruptFileError
from aigckit.train import checkpoint as ck
from aigckit.train.loop import TrainArgs, train
from imageutil import needs_data




def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@needs_data
@pytest.mark.parametrize("family,conditional", [("ddpm", True), ("vae", False), ("dcgan", True)])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, family, conditional):
    torch.set_num_threads(1)
    kw = dict(model=family, size="tiny", batch_size=8, conditional=conditional, log_every=2, ckpt_every=3,
              sample_every=1000, grid_n=4, grid_steps=2, timesteps=50)
    a = train(TrainArgs(out=str(tmp_path / "a"), steps=7, **kw), progress=False)
    train(TrainArgs(out=str(tmp_path / "b"), steps=4, **kw), progress=False)  # "interrupted" after step 4
    b = train(TrainArgs(out=str(tmp_path / "b"), steps=7, **kw), resume=True, progress=False)
    assert a.name == b.name == "step-000000007"
    for f in ("model.safetensors", "ema.safetensors", "trainer_state.safetensors"):
        assert _sha(a / f) == _sha(b / f), f
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert (tmp_path / "a" / "samples.png").exists() and (tmp_path / "a" / "curves.png").exists()


def test_checkpoint_is_atomic_under_a_crash(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    first = ck.save_checkpoint(tmp_path, step=1, config={"x": 1}, model=model, optimizers={"m": opt})
    real_save = ck.save_file
    calls = []

    def crashing_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # die between model.safetensors and the trainer state
            raise OSError("simulated crash (disk full / SIGKILL) mid-write")
        return real_save(tensors, path)

    monkeypatch.setattr(ck, "save_file", crashing_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(tmp_path, step=2, config={"x": 2}, model=model, optimizers={"m": opt})
    assert ck.list_checkpoints(tmp_path) == [first]
    assert ck.latest_checkpoint(tmp_path) == first
    # a half-written folder left by a real SIGKILL is invisible and removed by the next save
    (tmp_path / "checkpoints" / ".tmp-dead").mkdir()
    (tmp_path / "checkpoints" / ".tmp-dead" / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(ck, "save_file", real_save)
    assert ck.latest_checkpoint(tmp_path) == first
    ck.save_checkpoint(tmp_path, step=3, config={"x": 3}, model=model, optimizers={"m": opt})
    assert not (tmp_path / "checkpoints" / ".tmp-dead").exists()
    # optimiser state survives the round trip
    opt2 = torch.optim.Adam(model.parameters())
    tensors, meta = ck.load_trainer_state(ck.latest_checkpoint(tmp_path))
    ck.optimizer_from_flat({"m": opt2}, tensors, meta["optimizers"])
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"])


def test_corrupted_weights_are_detected(tmp_path):
    model = torch.nn.Linear(3, 2)
    c = ck.save_checkpoint(tmp_path, step=1, config={}, model=model)
    (c / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CorruptFileError, match="corrupted"):
        ck.load_weights(model, c / "model.safetensors")
    ck.save_checkpoint(tmp_path, step=2, config={}, model=torch.nn.Linear(3, 3))
    with pytest.raises(CorruptFileError, match="shape"):
        ck.load_weights(model, ck.latest_checkpoint(tmp_path) / "model.safetensors")


@needs_data
def test_sigkill_mid_run_resumes_from_last_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "aigckit", "image", "train", "--model", "vae", "--size", "tiny", "--out", str(run),
           "--steps", "100000", "--batch-size", "8", "--ckpt-every", "3", "--sample-every", "100000", "--quiet",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(ck.list_checkpoints(run)) < 2:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    last = ck.list_checkpoints(run)[-1]
    step = int(last.name.split("-")[1])
    assert step >= 6
    out = train(TrainArgs(model="vae", out=str(run), steps=step + 2), resume=True, progress=False)
    assert out.name == f"step-{step + 2:09d}"
    # killed before the first checkpoint: --resume starts the same run again from step 0
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_text((last / "config.json").read_text().replace(str(run), str(early)))
    assert train(TrainArgs(model="vae", out=str(early), steps=2), resume=True, progress=False).name == \
        "step-000000002"


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_last_byte(f: Path) -> None:  # same size, still parses: only the checksum can tell
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))


@needs_data
@pytest.mark.parametrize("damage,victim", [(_truncate, "model.safetensors"), (_flip_last_byte, "trainer_state.safetensors"),
                                          (lambda f: f.unlink(), "checksums.json")])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys, damage, victim):
    torch.set_num_threads(1)
    kw = dict(model="vae", size="tiny", batch_size=8, log_every=2, ckpt_every=3, sample_every=1000, grid_n=4)
    a = train(TrainArgs(out=str(tmp_path / "a"), steps=8, **kw), progress=False)
    train(TrainArgs(out=str(tmp_path / "b"), steps=6, **kw), progress=False)  # checkpoints at 3 and 6
    newest = ck.list_checkpoints(tmp_path / "b")[-1]
    assert newest.name == "step-000000006"
    if victim == "checksums.json":  # a checkpoint written before checksums, then truncated: read to verify it
        (newest / victim).unlink()
        _truncate(newest / "ema.safetensors")
    else:
        damage(newest / victim)
    capsys.readouterr()
    b = train(TrainArgs(out=str(tmp_path / "b"), steps=8, **kw), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint step-000000006" in err
    assert a.name == b.name == "step-000000008"
    for f in ("model.safetensors", "ema.safetensors", "trainer_state.safetensors"):
        assert _sha(a / f) == _sha(b / f), f  # resumed from step 3: bit for bit the uninterrupted run
    ck.verify_checkpoint(ck.list_checkpoints(tmp_path / "b")[0])  # step 6 was written again, intact
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


@needs_data
def test_run_config_is_written_atomically(tmp_path, monkeypatch):
    """The run's config.json survives a write that dies halfway (disk full), on a resume."""
    import builtins
    import errno
    import io

    run = tmp_path / "r"
    train(TrainArgs(model="vae", size="tiny", out=str(run), steps=2, batch_size=8, ckpt_every=1000), progress=False)
    before = (run / "config.json").read_text()
    real_open = io.open

    class HalfWriter:
        def __init__(self, fh):
            self._fh = fh

        def write(self, text):
            self._fh.write(text[: len(text) // 2])
            self._fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def crashing_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if "w" in mode and "config.json" in str(file) and Path(file).parent == run:
            return HalfWriter(fh)
        return fh

    monkeypatch.setattr(io, "open", crashing_open)
    monkeypatch.setattr(builtins, "open", crashing_open)
    with pytest.raises(OSError, match="simulated"):
        train(TrainArgs(model="vae", size="tiny", out=str(run), steps=4, batch_size=8, ckpt_every=1000), resume=True,
              progress=False)
    monkeypatch.undo()
    assert (run / "config.json").read_text() == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".config.json")] == []  # no temp file left


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (1, 2):
        c = ck.save_checkpoint(tmp_path, step=step, config={}, model=model)
        _truncate(c / "model.safetensors")
    seen = []
    with pytest.raises(CorruptFileError, match="no intact checkpoint.*step-000000002.*truncated.*step-000000001"):
        ck.latest_checkpoint(tmp_path, on_skip=lambda p, why: seen.append(p.name))
    assert seen == ["step-000000002", "step-000000001"]
