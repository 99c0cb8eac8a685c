"""POST /v1/audio/speech with the official `openai` client against a live server on a tiny random voice: the audio
equals the library's for the same seed in every format, it streams (bytes before the synthesis is done), speed,
SSE, errors that name the parameter; and the real voice over HTTP where it is pulled."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from audioutil import tiny_voice
from serveutil import API_KEY, LiveServer, free_port

from aigckit.audio import read_wav
from aigckit.audio.resample import resample

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! how vexingly quick."


class _SlowVoice:
    """Delegates to a voice, sleeping between chunks and noting when each was made (to see streaming)."""

    def __init__(self, voice) -> None:
        self.voice, self.made = voice, []

    def __getattr__(self, name):
        return getattr(self.voice, name)

    def stream(self, text, params):
        for c in self.voice.stream(text, params):
            self.made.append(time.monotonic())
            yield c
            time.sleep(0.15)


@pytest.fixture(scope="module")
def voice():
    v = tiny_voice(window_frames=64, threads=2)
    yield v
    v.close()


@pytest.fixture(scope="module")
def server(voice):
    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    slow = _SlowVoice(tiny_voice(window_frames=64, threads=1))
    reg = Registry.from_objects(speech={"tiny-voice": voice, "slow-voice": slow})
    srv = LiveServer(create_app(reg, api_key=API_KEY), free_port()).start()
    yield srv, slow
    srv.stop()
    slow.voice.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=API_KEY, max_retries=0)


def _speak(client, **kw):
    args = dict(model="tiny-voice", voice="default", input=TEXT, response_format="wav", extra_body={"seed": 5})
    args.update(kw)
    return client.audio.speech.create(**args)


def test_wav_equals_the_library_and_carries_its_parameters(client, voice):
    r = _speak(client)
    assert r.response.headers["content-type"] == "audio/wav"
    wav = read_wav(r.content)
    ref = voice.synthesize(TEXT, seed=5)
    assert wav.sample_rate == voice.sample_rate and len(wav.samples) == len(ref)
    np.testing.assert_allclose(wav.samples, np.clip(ref, -1, 1), atol=1.5 / 32767)
    assert "seed=5" in wav.info["ICMT"] and wav.info["IART"] == "aigckit voice tiny"
    assert r.response.headers["x-aigc-seed"] == "5"
    assert _speak(client).content == r.content  # same seed, same bytes
    assert _speak(client, extra_body={"seed": 6}).content != r.content
    assert _speak(client, voice="tiny-voice").content == r.content  # the model id names its one speaker too


def test_pcm_is_24khz_as_openai_documents(client, voice):
    pcm = _speak(client, response_format="pcm").content
    assert len(pcm) % 2 == 0
    got = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767
    ref = resample(np.clip(voice.synthesize(TEXT, seed=5), -1, 1), voice.sample_rate, 24_000)
    assert len(got) == len(ref)
    np.testing.assert_allclose(got, np.clip(ref, -1, 1), atol=1.5 / 32767)


def test_speed(client, voice):
    fast = read_wav(_speak(client, speed=2.0).content).samples
    ref = voice.synthesize(TEXT, seed=5, speed=2.0)
    np.testing.assert_allclose(fast, np.clip(ref, -1, 1), atol=1.5 / 32767)
    assert len(fast) < len(read_wav(_speak(client).content).samples)


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_compressed_formats_decode(client, voice, fmt):
    sf = pytest.importorskip("soundfile")
    r = _speak(client, response_format=fmt)
    assert r.response.headers["content-type"].startswith({"flac": "audio/flac", "mp3": "audio/mpeg",
                                                          "opus": "audio/ogg"}[fmt])
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    ref = voice.synthesize(TEXT, seed=5)
    if fmt == "flac":  # lossless 16-bit
        assert rate == voice.sample_rate
        np.testing.assert_allclose(audio, np.clip(ref, -1, 1), atol=1.5 / 32767)
    else:  # lossy: about the right length (mp3 pads with whole frames)
        assert rate == (24_000 if fmt == "opus" else voice.sample_rate)
        assert abs(len(audio) / rate - len(ref) / voice.sample_rate) < 0.2


def test_streams_bytes_before_the_synthesis_is_done(client, server):
    _, slow = server
    slow.made.clear()
    got = []
    with client.audio.speech.with_streaming_response.create(model="slow-voice", voice="default", input=TEXT,
                                                            response_format="pcm") as r:
        assert r.headers["content-type"] == "audio/pcm"
        for piece in r.iter_bytes():
            got.append((time.monotonic(), len(piece)))
    assert len(slow.made) >= 3
    assert got[0][0] < slow.made[-1]  # the first bytes arrived before the last chunk was synthesised
    assert sum(n for _, n in got) % 2 == 0


def test_sse_events(server, voice):
    srv, _ = server
    r = httpx.post(srv.url + "/v1/audio/speech", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   json={"model": "tiny-voice", "voice": "default", "input": TEXT, "response_format": "pcm",
                         "stream_format": "sse", "seed": 5})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == {"type": "speech.audio.done"}
    assert all(e["type"] == "speech.audio.delta" for e in events[:-1]) and len(events) > 2
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    plain = httpx.post(srv.url + "/v1/audio/speech", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                       json={"model": "tiny-voice", "voice": "default", "input": TEXT, "response_format": "pcm",
                             "seed": 5})
    assert pcm == plain.content


@pytest.mark.parametrize("kw,param", [
    (dict(voice="alloy"), "voice"),
    (dict(voice={"id": "voice_1234"}), "voice"),
    (dict(response_format="aac"), "response_format"),
    (dict(response_format="ogg"), "response_format"),
    (dict(speed=5.0), "speed"),
    (dict(speed=0.1), "speed"),
    (dict(input=""), "input"),
    (dict(input="x" * 4097), "input"),
    (dict(input="... !!! ???"), "input"),  # nothing to say
    (dict(instructions="Speak like a pirate."), "instructions"),
    (dict(extra_body={"noise_scale": 3}), "noise_scale"),
    (dict(extra_body={"seed": -1}), "seed"),
    (dict(extra_body={"pitch": 2}), "pitch"),
])
def test_errors_name_the_parameter(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _speak(client, **kw)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body


def test_model_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        _speak(client, model="tts-1")
    assert "tiny-voice" in e.value.body["message"]  # names the served voices
    models = {m.id: m for m in client.models.list().data}
    card = models["tiny-voice"].model_dump()
    assert card["kind"] == "speech" and card["voices"] == ["default", "tiny-voice"] and card["sample_rate"] == 8000


def test_metrics_count_the_audio(server, client):
    _speak(client)
    text = httpx.get(server[0].url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    line = next(x for x in text.splitlines() if x.startswith('aigc_audio_seconds_total{model="tiny-voice"}'))
    assert float(line.split()[-1]) > 0


def test_concurrent_requests_get_their_own_audio(client):
    want = {s: _speak(client, extra_body={"seed": s}).content for s in (1, 2)}
    got, errors = {}, []

    def run(s):
        try:
            got[s] = _speak(client, extra_body={"seed": s}).content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == want


def test_a_piper_onnx_file_is_served_as_a_voice(tmp_path):
    """``--model PATH.onnx`` (and ``--voice``) is detected as a voice, loaded by the registry and spoken (espeak-ng)."""
    from audioutil import tiny_model, write_piper_onnx

    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry, detect

    if not shutil.which("espeak-ng"):
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    path = write_piper_onnx(tiny_model(), tmp_path, "tiny-file")
    assert detect(str(path)) == ("tiny-file", "speech", str(path))
    assert detect(f"v=voice:{path}") == ("v", "speech", str(path))
    reg = Registry([str(path)])
    srv = LiveServer(create_app(reg, load_in_background=False), free_port()).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = c.audio.speech.create(model="tiny-file", voice="default", input="Hello there. How are you?",
                                  response_format="wav", extra_body={"seed": 0})
        wav = read_wav(r.content)
        assert wav.sample_rate == 8000 and len(wav.samples) > 800
    finally:
        srv.stop()


def test_fuzzed_requests_never_crash_the_server(server):
    """Schemathesis on the speech operation alone: valid requests (any text, formats, speeds) and broken ones get a
    2xx or 4xx, never a 5xx (the front end meets arbitrary Unicode here)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    srv, _ = server
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    op = next(r.ok() for r in schema.get_all_operations() if r.ok().label == "POST /v1/audio/speech")
    seen: set[int] = set()

    def served(case):
        if isinstance(case.body, dict):
            case.body.update(model="tiny-voice", voice="default")
            case.body.pop("instructions", None)
        return case

    for mode, n in ((GenerationMode.POSITIVE, 8), (GenerationMode.NEGATIVE, 5)):
        strategy = op.as_strategy(generation_mode=mode)
        if mode == GenerationMode.POSITIVE:
            strategy = strategy.map(served)

        @given(case=strategy)
        @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            r = case.call(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            seen.add(r.status_code)
            assert r.status_code < 500, (r.status_code, r.text[:300])

        check()
    assert 200 in seen and 400 in seen
