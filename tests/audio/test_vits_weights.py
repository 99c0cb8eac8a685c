"""The ONNX-initializer loader on synthetic Piper-style files: config read off the graph, the name table (including
the anonymous onnx::Conv_* weights and the folded exp(-logs)), and strictness."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from aigckit.audio.voice import load_voice
from aigckit.audio.weights import OnnxWeights, config_from_onnx, find_voice_files, load_vits
from aigckit.errors import AigcError, CorruptFileError, UnsupportedFormatError
from audioutil import letters, tiny_model, write_piper_onnx


def test_roundtrip_config_and_weights(tmp_path):
    model = tiny_model(seed=4)
    path = write_piper_onnx(model, tmp_path / "v")
    w = OnnxWeights(path)
    assert "sid" in w.arrays and any(n.startswith("onnx::Conv_") for n in w.arrays)
    assert config_from_onnx(w, 8000) == model.cfg
    loaded = load_vits(path, 8000)
    for k, v in model.state_dict().items():
        tol = 1e-6 if k == "dp.flows.0.logs" else 0.0  # stored as exp(-logs), read back through -log
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=tol, rtol=tol)
    ids = torch.randint(0, model.cfg.n_vocab, (1, 15))
    a, _ = model.infer(ids, generator=torch.Generator().manual_seed(0))
    b, _ = loaded.infer(ids, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _rewrite(path, edit):
    m = onnx.load(str(path))
    edit(m.graph)
    onnx.save(m, str(path))


def test_strictness(tmp_path):
    model = tiny_model()
    path = write_piper_onnx(model, tmp_path / "missing")

    def drop(g):
        keep = [t for t in g.initializer if t.name != "dec.conv_post.weight"]
        del g.initializer[:]
        g.initializer.extend(keep)
    _rewrite(path, drop)
    with pytest.raises(UnsupportedFormatError, match="dec.conv_post.weight"):
        load_vits(path, 8000)

    path = write_piper_onnx(model, tmp_path / "extra")
    _rewrite(path, lambda g: g.initializer.append(numpy_helper.from_array(np.ones((4, 4), np.float32), "emb_g.weight")))
    with pytest.raises(UnsupportedFormatError, match="emb_g.weight"):
        load_vits(path, 8000)

    path = write_piper_onnx(model, tmp_path / "shape")

    def reshape(g):
        for t in g.initializer:
            if t.name == "enc_p.proj.bias":
                t.CopyFrom(numpy_helper.from_array(np.zeros(3, np.float32), t.name))
    _rewrite(path, reshape)
    with pytest.raises(CorruptFileError, match="enc_p.proj.bias"):
        load_vits(path, 8000)

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(CorruptFileError, match="not a readable ONNX"):
        OnnxWeights(bad)


def test_voice_files_and_config_errors(tmp_path):
    path = write_piper_onnx(tiny_model(), tmp_path / "v")
    assert find_voice_files(tmp_path / "v").onnx == path
    cfg = json.loads(path.with_name(path.name + ".json").read_text())
    cfg["num_speakers"] = 4
    path.with_name(path.name + ".json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFormatError, match="multi-speaker"):
        load_voice(path)
    path.with_name(path.name + ".json").unlink()
    with pytest.raises(AigcError, match="onnx.json"):
        find_voice_files(path)
    with pytest.raises(AigcError, match="no such file"):
        load_voice(tmp_path / "nope.onnx")


def test_load_voice_from_folder_speaks(tmp_path):
    write_piper_onnx(tiny_model(), tmp_path / "v")
    voice = load_voice(tmp_path / "v", threads=1, phonemizer=letters)
    audio = voice.synthesize("hello there. general kenobi", seed=0)
    assert audio.dtype == np.float32 and len(audio) > 0 and np.abs(audio).max() <= 1.0
    voice.close()
