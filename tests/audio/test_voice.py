"""The Voice pipeline on a tiny random voice (no espeak): exact against ``VitsModel.infer``, deterministic, the same
audio streamed, whole and piece by piece, first audio before the text is all there, and safe from threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from aigckit.audio import SpeechParams, read_wav, speech_bytes
from aigckit.audio.voice import utterance_seed
from aigckit.errors import AigcError
from audioutil import tiny_voice

TEXT = ("the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! "
        "how vexingly quick daft zebras jump?\n\nsphinx of black quartz, judge my vow.")


@pytest.fixture(scope="module")
def voice():
    v = tiny_voice(window_frames=64, threads=2)  # small windows: several per sentence
    yield v
    v.close()


def test_pipeline_equals_infer_per_utterance(voice):
    params = voice.resolve(seed=3)
    chunks = list(voice.stream(TEXT, params))
    utts = list(voice.utterances(TEXT, params))
    got = {}
    for c in chunks:
        got.setdefault(c.index, []).append(c.samples)
    assert sorted(got) == list(range(len(utts)))
    n_windows = 0
    for i, u in enumerate(utts):
        g = torch.Generator().manual_seed(utterance_seed(params.seed, i))
        ref, align = voice.model.infer(torch.tensor([u.ids]), noise_scale=params.noise_scale, noise_w=params.noise_w,
                                       generator=g)
        pause = int(round(u.pause_before * voice.sample_rate))
        audio = np.concatenate(got[i])
        assert np.all(audio[:pause] == 0)
        np.testing.assert_allclose(audio[pause:], ref[0].numpy(), atol=3e-4, rtol=0)
        n_windows = max(n_windows, len(voice.windows(int(align.frame_lengths[0]))))
    assert n_windows >= 2  # the windowed decoder was really exercised


def test_windows_cover_every_frame_with_context(voice):
    M = voice.margin
    for n in [1, 5, 47, 48, 49, 63, 64, 100, 333, 1000]:
        ws = voice.windows(n)
        assert ws[0][0] == 0 and ws[0][2] == 0 and ws[-1][3] == n
        for (s, e, k0, k1), nxt in zip(ws, ws[1:] + [None]):
            assert s <= k0 < k1 <= e <= n and e - s <= voice.window_frames
            assert k0 - s >= M or s == 0  # left context, or the true start
            assert e - k1 >= M or e == n  # right context, or the true end
            if nxt is not None:
                assert nxt[2] == k1  # kept parts tile the utterance
    assert voice.windows(1000)[0][1] == voice.first_window_frames
    with pytest.raises(AigcError, match="first_window_frames"):
        tiny_voice(first_window_frames=4)


def test_deterministic_and_seed_sensitive(voice):
    a = voice.synthesize(TEXT, seed=11)
    b = voice.synthesize(TEXT, seed=11)
    c = voice.synthesize(TEXT, seed=12)
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert voice.resolve().seed != voice.resolve().seed  # no seed: a fresh one each time


def test_stream_whole_and_pieces_agree(voice):
    params = voice.resolve(seed=1)
    whole = voice.synthesize(TEXT, params)
    streamed = np.concatenate([c.samples for c in voice.stream(TEXT, params)])
    s = voice.speech_stream(params)
    pieces = []
    for i in range(0, len(TEXT), 7):
        pieces += s.feed(TEXT[i:i + 7])
    pieces += s.close()
    assert np.array_equal(whole, streamed)
    assert np.array_equal(whole, np.concatenate([c.samples for c in pieces]))
    iterable = np.concatenate([c.samples for c in voice.stream(iter([TEXT[:20], TEXT[20:]]), params)])
    assert np.array_equal(whole, iterable)
    with pytest.raises(AigcError, match="closed"):
        s.feed("more")


def test_pauses_between_sentences(voice):
    params = voice.resolve(seed=0, sentence_silence=0.5, paragraph_silence=1.0)
    utts = list(voice.utterances(TEXT, params))
    assert [u.pause_before for u in utts] == [0.0, 0.5, 0.5, 1.0]
    first = {}
    for c in voice.stream(TEXT, params):
        first.setdefault(c.index, c.samples)
    assert np.all(first[3][:8000] == 0)  # a second of silence before the new paragraph (8 kHz)


def test_first_audio_before_the_text_ends(voice):
    consumed = []

    def pieces():
        for sentence in ["first sentence here. ", "second one. ", "third one. ", "fourth."]:
            consumed.append(sentence)
            yield sentence

    it = voice.stream(pieces(), seed=0)
    first = next(it)
    assert first.index == 0 and len(consumed) < 4  # speaking began while text was still to come
    rest = list(it)
    assert len(consumed) == 4 and rest[-1].index == 3 and rest[-1].last


def test_concurrent_requests_get_their_own_audio(voice):
    texts = {s: f"sentence for request {s}. and a second one." for s in range(4)}
    alone = {s: voice.synthesize(t, seed=s) for s, t in texts.items()}
    results = {}

    def run(s):
        results[s] = voice.synthesize(texts[s], seed=s)

    threads = [threading.Thread(target=run, args=(s,)) for s in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in texts:
        assert np.array_equal(results[s], alone[s])


def test_params_validation(voice):
    for kw, msg in [({"speed": 0}, "speed"), ({"speed": 5}, "speed"), ({"noise_scale": -1}, "noise_scale"),
                    ({"noise_w": float("nan")}, "noise_w"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
                    ({"sentence_silence": 99}, "sentence_silence")]:
        with pytest.raises(AigcError, match=msg):
            SpeechParams(**kw)
    with pytest.raises(AigcError, match="text pieces must be strings"):
        list(voice.stream([b"bytes"], seed=0))
    assert voice.synthesize("", seed=0).shape == (0,)
    assert voice.synthesize("!!! ... ??? 😀", seed=0).shape == (0,)  # nothing the tiny phonemiser can say


def test_speed_changes_length(voice):
    slow = voice.synthesize("a b c d e f g h", seed=0, speed=0.5, noise_w=0)
    fast = voice.synthesize("a b c d e f g h", seed=0, speed=2.0, noise_w=0)
    assert len(slow) > 2 * len(fast)


def test_speech_bytes_wav_and_pcm(voice):
    params = voice.resolve(seed=2)
    audio = voice.synthesize(TEXT, params)
    wav = b"".join(speech_bytes(voice, TEXT, params))
    w = read_wav(wav)
    assert w.sample_rate == 8000 and len(w.samples) == len(audio)
    assert np.abs(w.samples - np.clip(audio, -1, 1)).max() < 1 / 32767 + 1e-6
    assert "seed=2" in w.info["ICMT"] and w.info["IART"].endswith("tiny") and w.info["INAM"].startswith("the quick")
    pcm = b"".join(speech_bytes(voice, TEXT, params, format="pcm"))
    assert pcm == wav[len(wav) - 2 * len(audio):]
    with pytest.raises(AigcError, match="format"):
        b"".join(speech_bytes(voice, TEXT, params, format="mp3"))
