"""`aigc chat --speak-out / --speak`: the reply is read aloud sentence by sentence while it streams, into a WAV
(no sound device needed) with the same audio as `Voice.synthesize` of the reply; --speak fails clearly without a
sound device. A tiny chat model, a tiny random voice saved as a Piper-style ONNX file, phonemes from espeak-ng."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aigckit.audio import espeak, load_voice, read_wav
from aigckit.cli import main
from audioutil import saved_tiny_voice

pytestmark = pytest.mark.skipif(not espeak.available(), reason="espeak-ng not installed (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def voice_dir(tmp_path_factory) -> Path:
    return saved_tiny_voice(tmp_path_factory, seed=4)


@pytest.fixture(scope="module")
def chat_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat") / "chatty"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
                            "{% if add_generation_prompt %}w3 {% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_one_shot_reply_spoken_to_a_wav(capsys, monkeypatch, tmp_path, chat_dir, voice_dir):
    out = tmp_path / "reply.wav"
    monkeypatch.setattr("sys.stdin", io.StringIO("w9 w10"))
    rc = main(["chat", "--model", str(chat_dir), "-t", "0", "--max-new-tokens", "12", "--seed", "3",
               "--speak-out", str(out), "--voice", str(voice_dir)])
    std = capsys.readouterr()
    assert rc == 0, std.err
    reply = std.out.strip()
    assert reply and "spoken:" in std.err and str(out) in std.err
    wav = read_wav(out.read_bytes())
    voice = load_voice(voice_dir)
    try:
        ref = voice.synthesize(reply, seed=3)
    finally:
        voice.close()
    assert wav.sample_rate == voice.sample_rate and len(wav.samples) == len(ref) > 0
    np.testing.assert_allclose(wav.samples, np.clip(ref, -1, 1), atol=1.5 / 32767)
    assert "seed=3" in wav.info["ICMT"]
    assert not list(tmp_path.glob("*.part"))


def test_each_sentence_is_spoken_while_the_reply_still_streams(tmp_path, voice_dir):
    from aigckit.cli.audio import ReplySpeaker

    args = argparse.Namespace(speak=False, speak_out=str(tmp_path / "s.wav"), voice=str(voice_dir), speak_speed=1.0,
                              seed=1)
    speaker = ReplySpeaker(args)
    spoken_before_end = threading.Event()

    def reply():  # an LLM reply: the rest only comes once the first sentence has been heard
        yield from ["Hello ", "there", ". ", "How"]  # the splitter ends a sentence when it sees what follows
        deadline = time.monotonic() + 60
        while speaker.seconds == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if speaker.seconds > 0:
            spoken_before_end.set()
        yield from [" are ", "you?"]

    assert "".join(speaker(reply())) == "Hello there. How are you?"
    first = speaker.seconds
    assert "".join(speaker(iter(["A second reply."]))) == "A second reply."  # replies follow in the same file
    speaker.close()
    assert spoken_before_end.is_set()
    wav = read_wav((tmp_path / "s.wav").read_bytes())
    assert abs(len(wav.samples) / wav.sample_rate - speaker.seconds) < 1e-3 and speaker.seconds > first


def test_speak_streams_a_wav_into_the_player(capsys, monkeypatch, tmp_path, chat_dir, voice_dir):
    played = tmp_path / "played.wav"  # the "player" writes what it is sent to a file
    monkeypatch.setattr("aigckit.audio.playback.player_command", lambda: ["sh", "-c", f"cat > '{played}'"])
    monkeypatch.setattr("sys.stdin", io.StringIO("w9 w10"))
    args = ["chat", "--model", str(chat_dir), "-t", "0", "--max-new-tokens", "12", "--seed", "3", "--voice",
            str(voice_dir)]
    assert main(args + ["--speak"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("w9 w10"))
    assert main(args + ["--speak-out", str(tmp_path / "file.wav")]) == 0
    data = played.read_bytes()
    assert data[4:8] == b"\xff\xff\xff\xff"  # a streaming WAV header: sent before the length was known
    np.testing.assert_array_equal(read_wav(data).samples, read_wav((tmp_path / "file.wav").read_bytes()).samples)


def test_speak_without_a_sound_device_is_one_clear_line(capsys, monkeypatch, chat_dir, voice_dir):
    monkeypatch.setattr("aigckit.audio.playback._pulse_or_pipewire", lambda: False)
    monkeypatch.setattr("aigckit.audio.playback._alsa_device", lambda: False)
    monkeypatch.setattr("sys.stdin", io.StringIO("w9 w10"))
    rc = main(["chat", "--model", str(chat_dir), "--speak", "--voice", str(voice_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "no sound device" in err and "--speak-out" in err and len(err.strip().splitlines()) == 1


def test_bad_speech_option_fails_before_loading(capsys, monkeypatch, chat_dir, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO("w9 w10"))
    rc = main(["chat", "--model", str(chat_dir), "--speak-out", str(tmp_path / "x.wav"), "--speak-speed", "9"])
    err = capsys.readouterr().err
    assert rc == 2 and "speed must be a number in [0.25, 4.0], got 9.0" in err
