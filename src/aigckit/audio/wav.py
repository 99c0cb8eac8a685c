"""WAV (RIFF, 16-bit PCM, mono) written by hand, with the synthesis parameters in a LIST/INFO chunk.

Layout: ``RIFF <size> WAVE`` + ``fmt `` + ``LIST INFO`` (before the audio, so a streamed file carries it too) +
``data``. When the total length is not known yet (streaming to a pipe or an HTTP response) the RIFF and data sizes
are written as 0xFFFFFFFF, the convention players and ffmpeg accept for "until the end of the stream"; a seekable
file gets its real sizes patched in on ``close()``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from aigckit.errors import AigcError, CorruptFileError

UNKNOWN_SIZE = 0xFFFFFFFF


def pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> little-endian int16 bytes (clipped, rounded)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def info_chunk(info: dict[str, str]) -> bytes:
    """A LIST/INFO chunk: four-letter ids (INAM title, IART artist, ISFT software, ICMT comment, ...) -> text."""
    body = b"INFO"
    for key, value in info.items():
        if len(key) != 4 or not key.isascii():
            raise AigcError(f"INFO key must be four ASCII characters, got {key!r}")
        data = value.encode("utf-8") + b"\0"
        if len(data) % 2:
            data += b"\0"
        body += key.encode("ascii") + struct.pack("<I", len(data)) + data
    return b"LIST" + struct.pack("<I", len(body)) + body


def wav_header(sample_rate: int, *, n_samples: int | None = None, info: dict[str, str] | None = None) -> bytes:
    """Header up to and including the data chunk's size field. ``n_samples=None``: unknown (streaming) sizes."""
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
    lst = info_chunk(info) if info else b""
    if n_samples is None:
        riff_size = data_size = UNKNOWN_SIZE
    else:
        data_size = 2 * n_samples
        riff_size = 4 + len(fmt) + len(lst) + 8 + data_size
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + fmt + lst + b"data" + struct.pack("<I", data_size)


class WavWriter:
    """Writes chunks of float samples as they come; patches the sizes at the end when the file is seekable."""

    def __init__(self, f: BinaryIO, sample_rate: int, info: dict[str, str] | None = None):
        self.f, self.n_samples = f, 0
        self.header = wav_header(sample_rate, info=info)
        f.write(self.header)

    def write(self, samples: np.ndarray) -> None:
        self.f.write(pcm16(samples))
        self.n_samples += len(samples)

    def close(self) -> None:
        data_size = 2 * self.n_samples
        seekable = getattr(self.f, "seekable", lambda: False)()
        if seekable:
            end = self.f.tell()
            self.f.seek(4)
            self.f.write(struct.pack("<I", len(self.header) - 8 + data_size))
            self.f.seek(len(self.header) - 4)
            self.f.write(struct.pack("<I", data_size))
            self.f.seek(end)
        self.f.flush()


def encode_stream(chunks: Iterable[np.ndarray], sample_rate: int, *, format: str = "wav",
                  info: dict[str, str] | None = None) -> Iterator[bytes]:
    """Float sample chunks -> bytes to send as they come: ``wav`` (streaming header, then PCM) or ``pcm`` (raw
    16-bit little-endian mono at ``sample_rate``)."""
    if format not in ("wav", "pcm"):
        raise AigcError(f"format must be 'wav' or 'pcm', got {format!r}")
    if format == "wav":
        yield wav_header(sample_rate, info=info)
    for c in chunks:
        if len(c):
            yield pcm16(c)


@dataclass(frozen=True)
class Wav:
    samples: np.ndarray  # float32 in [-1, 1]
    sample_rate: int
    info: dict[str, str]


def read_wav(data: bytes) -> Wav:
    """Parse a 16-bit mono PCM WAV written by us (or anyone), streaming sizes included."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise CorruptFileError("not a RIFF/WAVE file")
    pos, rate, info, samples = 12, None, {}, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8: len(data) if size == UNKNOWN_SIZE else pos + 8 + size]
        if cid == b"fmt ":
            tag, ch, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if (tag, ch, bits) != (1, 1, 16):
                raise CorruptFileError(f"only 16-bit mono PCM is read here (format {tag}, {ch} ch, {bits} bit)")
        elif cid == b"LIST" and body[:4] == b"INFO":
            p = 4
            while p + 8 <= len(body):
                k, n = body[p:p + 4].decode("ascii"), struct.unpack("<I", body[p + 4:p + 8])[0]
                info[k] = body[p + 8:p + 8 + n].rstrip(b"\0").decode("utf-8")
                p += 8 + n + (n % 2)
        elif cid == b"data":
            samples = np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.float32) / 32767.0
        if size == UNKNOWN_SIZE:
            break
        pos += 8 + size + (size % 2)
    if rate is None or samples is None:
        raise CorruptFileError("WAV without fmt or data chunk")
    return Wav(samples, rate, info)
