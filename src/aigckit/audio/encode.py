"""Audio chunks -> bytes in the formats of OpenAI's speech API: ``wav``, ``pcm``, ``flac``, ``mp3``, ``opus``.

| format | what | streamed | rate |
|---|---|---|---|
| wav | RIFF 16-bit mono, LIST/INFO with the parameters, streaming sizes (``wav.py``) | yes | the voice's |
| pcm | raw 16-bit little-endian mono, no header | yes | 24 kHz, as OpenAI documents (resampled) |
| opus | Ogg Opus (libsndfile via ``soundfile``) | yes, page by page | 24 kHz (Opus has no 22.05 kHz) |
| flac | FLAC 16-bit (libsndfile) | no: sent when complete | the voice's |
| mp3 | MPEG-1/2 layer III (libsndfile's LAME) | no: sent when complete | the voice's |

FLAC and MP3 are sent whole: libsndfile writes their headers (FLAC's STREAMINFO, MP3's Xing frame count) when the
file is closed, and a stream sent before that is misread by decoders (MP3 cut short, FLAC without a length).
``soundfile`` (BSD; its wheels bundle libsndfile >= 1.1, which has MP3 and Opus) is the ``speech`` extra.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from aigckit.audio.resample import Resampler
from aigckit.audio.wav import pcm16, wav_header
from aigckit.errors import AigcError

OPENAI_PCM_RATE = 24_000


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    streams: bool  # bytes go out as the audio is synthesised
    rate: int | None  # fixed output rate; None = the voice's
    sf: tuple[str, str] | None = None  # soundfile (format, subtype)


FORMATS = {f.name: f for f in (
    AudioFormat("wav", "audio/wav", True, None),
    AudioFormat("pcm", "audio/pcm", True, OPENAI_PCM_RATE),
    AudioFormat("opus", "audio/ogg; codecs=opus", True, 24_000, ("OGG", "OPUS")),
    AudioFormat("flac", "audio/flac", False, None, ("FLAC", "PCM_16")),
    AudioFormat("mp3", "audio/mpeg", False, None, ("MP3", "MPEG_LAYER_III")),
)}


def audio_format(name: str) -> AudioFormat:
    """The format called ``name``; AigcError(param='response_format') for an unknown one or a missing encoder."""
    f = FORMATS.get(name)
    if f is None:
        raise AigcError(f"response_format must be one of {', '.join(FORMATS)}, got {name!r}", param="response_format")
    if f.sf is not None:
        try:
            import soundfile
        except ImportError:
            raise AigcError(f"response_format {name} needs the soundfile package (pip install 'aigckit[speech]'); "
                            "wav and pcm need nothing", param="response_format") from None
        fmt, sub = f.sf
        if sub not in soundfile.available_subtypes(fmt):
            raise AigcError(f"response_format {name} needs libsndfile >= 1.1 with {sub}; this one has "
                            f"{soundfile.__libsndfile_version__}", param="response_format")
    return f


class _Sink(io.RawIOBase):
    """A seekable in-memory file for libsndfile that hands out the bytes written since the last ``take()``."""

    def __init__(self) -> None:
        self.buf, self.pos, self.sent = bytearray(), 0, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        self.buf[self.pos:self.pos + len(b)] = b
        self.pos += len(b)
        return len(b)

    def read(self, n: int = -1) -> bytes:
        end = len(self.buf) if n is None or n < 0 else self.pos + n
        out = bytes(self.buf[self.pos:end])
        self.pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: len(self.buf) + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def take(self) -> bytes:
        out = bytes(self.buf[self.sent:])
        self.sent = len(self.buf)
        return out


def encode_audio(chunks: Iterable[np.ndarray], sample_rate: int, format: str = "wav", *,
                 info: dict[str, str] | None = None) -> tuple[int, Iterator[bytes]]:
    """(output sample rate, the bytes as they are ready). ``chunks``: float32 mono in [-1, 1] at ``sample_rate``."""
    f = audio_format(format)
    rate = f.rate or sample_rate
    if rate != sample_rate:
        chunks = _resampled(chunks, sample_rate, rate)
    if f.sf is None:
        return rate, _raw(chunks, rate, f.name == "wav", info)
    return rate, _soundfile(chunks, rate, f, info)


def _resampled(chunks: Iterable[np.ndarray], rate_in: int, rate_out: int) -> Iterator[np.ndarray]:
    r = Resampler(rate_in, rate_out)
    for c in chunks:
        yield r.push(c)
    yield r.close()


def _raw(chunks: Iterable[np.ndarray], rate: int, header: bool, info: dict[str, str] | None) -> Iterator[bytes]:
    head = wav_header(rate, info=info) if header else b""  # goes out with the first audio: one piece, not two
    for c in chunks:
        if len(c):
            yield head + pcm16(c)
            head = b""
    if head:
        yield head


def _soundfile(chunks: Iterable[np.ndarray], rate: int, f: AudioFormat, info: dict[str, str] | None
               ) -> Iterator[bytes]:
    import soundfile

    sink = _Sink()
    fmt, sub = f.sf  # type: ignore[misc]
    with soundfile.SoundFile(sink, "w", samplerate=rate, channels=1, format=fmt, subtype=sub) as out:
        if info and f.name != "mp3":  # Vorbis comments (FLAC, Ogg); libsndfile writes none into MP3
            for attr, key in (("title", "INAM"), ("artist", "IART"), ("software", "ISFT"), ("comment", "ICMT")):
                if key in info:
                    setattr(out, attr, info[key])
        for c in chunks:
            if len(c):
                out.write(np.clip(np.asarray(c, np.float32), -1.0, 1.0))
                if f.streams:
                    data = sink.take()
                    if data:
                        yield data
    yield sink.take() if f.streams else bytes(sink.buf)
