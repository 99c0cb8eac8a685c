"""WAV writing by hand: header fields, LIST/INFO, streaming sizes, patched sizes, and that Python's own reader
agrees on the audio."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import pytest

from aigckit.audio.wav import UNKNOWN_SIZE, WavWriter, encode_stream, info_chunk, pcm16, read_wav, wav_header
from aigckit.errors import AigcError, CorruptFileError


def test_pcm16_clips_and_rounds():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 1 / 32767, 0.5, 1.0, 3.0], np.float32)
    got = np.frombuffer(pcm16(x), "<i2").tolist()
    assert got == [-32767, -32767, -16384, 0, 1, 16384, 32767, 32767]


def test_info_chunk_layout():
    c = info_chunk({"INAM": "hi", "ICMT": "abc"})
    assert c[:4] == b"LIST" and c[8:12] == b"INFO"
    assert struct.unpack("<I", c[4:8])[0] == len(c) - 8
    assert c[12:16] == b"INAM" and struct.unpack("<I", c[16:20])[0] == 4 and c[20:24] == b"hi\0\0"  # even padding
    with pytest.raises(AigcError, match="four ASCII"):
        info_chunk({"NAME": "x", "TOOLONG": "y"})


def test_file_writer_patches_sizes_and_stdlib_reads_it():
    rng = np.random.default_rng(0)
    parts = [rng.uniform(-1, 1, n).astype(np.float32) for n in (100, 0, 257)]
    buf = io.BytesIO()
    w = WavWriter(buf, 22050, {"ISFT": "aigckit", "ICMT": "seed=1"})
    for p in parts:
        w.write(p)
    w.close()
    data = buf.getvalue()
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    with wave.open(io.BytesIO(data)) as wf:
        assert (wf.getframerate(), wf.getnchannels(), wf.getsampwidth(), wf.getnframes()) == (22050, 1, 2, 357)
        frames = wf.readframes(357)
    assert frames == pcm16(np.concatenate(parts))
    r = read_wav(data)
    assert r.info == {"ISFT": "aigckit", "ICMT": "seed=1"} and len(r.samples) == 357


def test_streaming_header_and_reader():
    h = wav_header(16000, info={"INAM": "x"})
    assert struct.unpack("<I", h[4:8])[0] == UNKNOWN_SIZE and h.endswith(b"data" + struct.pack("<I", UNKNOWN_SIZE))
    data = b"".join(encode_stream([np.zeros(10, np.float32), np.ones(5, np.float32)], 16000, info={"INAM": "x"}))
    r = read_wav(data)
    assert r.sample_rate == 16000 and len(r.samples) == 15 and r.info == {"INAM": "x"}
    assert b"".join(encode_stream([np.ones(3, np.float32)], 16000, format="pcm")) == pcm16(np.ones(3))
    with pytest.raises(CorruptFileError):
        read_wav(b"RIFX....")


def test_known_size_header():
    h = wav_header(8000, n_samples=100)
    assert struct.unpack("<I", h[4:8])[0] == len(h) - 8 + 200
    assert struct.unpack("<I", h[-4:])[0] == 200
