"""Streaming resampler (exact under any chunking, a clean sine stays clean) and the speech API's audio formats."""

from __future__ import annotations

import io

import numpy as np
import pytest

from aigckit.audio.encode import FORMATS, audio_format, encode_audio
from aigckit.audio.resample import Resampler, resample
from aigckit.audio.wav import read_wav
from aigckit.errors import AigcError


def _sine(freq: float, rate: int, n: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


@pytest.mark.parametrize("rate_in,rate_out", [(22050, 24000), (22050, 48000), (24000, 16000), (8000, 8000)])
def test_resampler_any_chunking_gives_the_same_samples(rate_in, rate_out):
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 0.3
    whole = resample(x, rate_in, rate_out)
    assert len(whole) == -(-len(x) * rate_out // rate_in)
    for size in (1, 7, 100, 4999):
        r = Resampler(rate_in, rate_out)
        parts = [r.push(x[i:i + size]) for i in range(0, len(x), size)] + [r.close()]
        assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("freq", [440.0, 3000.0, 6000.0])  # speech lives below 8 kHz
def test_resampled_sine_is_the_same_sine(freq):
    y = resample(_sine(freq, 22050, 22050), 22050, 24000)
    ref = _sine(freq, 24000, len(y))
    mid = slice(200, -200)  # the ends see the zeros around the signal
    assert np.abs(y[mid] - ref[mid]).max() < 2e-3


def test_downsampling_removes_what_the_new_rate_cannot_hold():
    y = resample(_sine(10_000, 24000, 24000), 24000, 16000)  # above the new Nyquist (8 kHz)
    assert np.sqrt(np.mean(y[200:-200] ** 2)) < 0.01


def _decode(fmt: str, data: bytes) -> tuple[np.ndarray, int]:
    if fmt == "wav":
        w = read_wav(data)
        return w.samples, w.sample_rate
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767, 24000
    sf = pytest.importorskip("soundfile")
    a, rate = sf.read(io.BytesIO(data), dtype="float32")
    return a, rate


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_formats_round_trip(fmt):
    if FORMATS[fmt].sf is not None:
        pytest.importorskip("soundfile")
    x = _sine(440, 22050, 22050)
    chunks = [x[:3000], x[3000:3000], x[3000:]]
    rate, it = encode_audio(chunks, 22050, fmt, info={"INAM": "a title", "ICMT": "seed=1"})
    pieces = list(it)
    audio, got_rate = _decode(fmt, b"".join(pieces))
    assert got_rate == rate == (FORMATS[fmt].rate or 22050)
    ref = resample(x, 22050, rate)
    if fmt in ("wav", "pcm", "flac"):  # lossless at 16 bits
        np.testing.assert_allclose(audio, ref, atol=1.5 / 32767)
    else:
        assert abs(len(audio) / rate - 1.0) < 0.1
        spectrum = np.abs(np.fft.rfft(audio))
        assert abs(np.argmax(spectrum) * rate / len(audio) - 440) < 5
    if FORMATS[fmt].streams:
        assert len(pieces) >= 2  # bytes went out before the last chunk came in


def test_unknown_format_names_the_param():
    with pytest.raises(AigcError) as e:
        audio_format("aiff")
    assert e.value.param == "response_format"
