"""Reader for the IDX format of (Fashion-)MNIST: a 4-byte magic number, big-endian dimension sizes, raw data.

Magic: two zero bytes, one type byte (0x08 = uint8, ...), one byte = number of dimensions. Gzip is detected by
its own magic number, so ``.gz`` and plain files both work.
"""

from __future__ import annotations

import gzip
import struct
from typing import BinaryIO

import numpy as np

from aigckit.errors import CorruptFileError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, name: str = "<idx>") -> np.ndarray:
    """Decode the bytes of one IDX file (optionally gzip-compressed) into an array of the header's shape."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CorruptFileError(f"{name}: broken gzip stream ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CorruptFileError(f"{name}: not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _DTYPES or ndim == 0:
        raise CorruptFileError(f"{name}: unknown IDX type 0x{type_code:02x} or zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptFileError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise CorruptFileError(f"{name}: header says {shape} ({expected} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(f: BinaryIO | str, name: str | None = None) -> np.ndarray:
    """Read an IDX file from an open binary file or an fsspec URL."""
    if isinstance(f, str):
        import fsspec

        with fsspec.open(f, "rb") as fh:
            return parse_idx(fh.read(), name or f)
    return parse_idx(f.read(), name or getattr(f, "name", "<idx>"))
