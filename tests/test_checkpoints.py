"""aigckit.checkpoints (the read side of runs): verification, fallback, and that it sits below image/ and train/."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aigckit import checkpoints
from aigckit.errors import CorruptFileError


def _image_run(root):
    from aigckit.image.api import build_model
    from aigckit.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    c, model = build_model("dcgan", {"nz": 4, "ngf": 4, "ndf": 4})
    config = {"family": "dcgan", "model": c.to_dict(), "data": {"class_names": [], "resolution": 28, "channels": 1}}
    for step in (1, 2):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        save_checkpoint(root, step=step, config=config, model=model, ema=model)
    return root


def test_checksums_are_written_last_and_cover_every_file(tmp_path):
    run = _image_run(tmp_path)
    c = checkpoints.list_checkpoints(run)[-1]
    sums = json.loads((c / "checksums.json").read_text())
    assert sorted(sums["files"]) == sorted(f.name for f in c.iterdir() if f.name != "checksums.json")
    checkpoints.verify_checkpoint(c)
    (c / "config.json").write_text((c / "config.json").read_text() + " ")
    with pytest.raises(CorruptFileError, match="config.json: .* bytes, checksums.json says"):
        checkpoints.verify_checkpoint(c)


def test_load_image_model_uses_the_newest_intact_checkpoint(tmp_path, capsys):
    from aigckit.image.api import load_image_model

    run = _image_run(tmp_path)
    newest = checkpoints.list_checkpoints(run)[-1]
    assert load_image_model(run).step == 2
    ema = newest / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    m = load_image_model(run)
    assert m.step == 1 and "skipping damaged checkpoint step-000000002" in capsys.readouterr().err
    with pytest.raises(CorruptFileError, match="truncated"):
        load_image_model(newest)  # asked for that very checkpoint: an error, not a fallback


def test_reading_a_run_does_not_import_the_trainers(tmp_path):
    """image/ reads checkpoints through aigckit.checkpoints, below it; the write side stays in train/."""
    run = _image_run(tmp_path)
    code = ("import sys; from aigckit.image.api import load_image_model; load_image_model(sys.argv[1]); "
            "print([m for m in sys.modules if m.startswith('aigckit.train')])")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
