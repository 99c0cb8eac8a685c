import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from aigckit.data.idx import parse_idx, read_idx
from aigckit.errors import CorruptFileError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_roundtrip_plain_and_gzip():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(_idx(a)), a)
    np.testing.assert_array_equal(parse_idx(gzip.compress(_idx(a))), a)


def test_bad_files_raise():
    a = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(CorruptFileError, match="magic"):
        parse_idx(b"\x01\x02" + _idx(a)[2:])
    with pytest.raises(CorruptFileError, match="bytes follow"):
        parse_idx(_idx(a)[:-1])
    with pytest.raises(CorruptFileError, match="gzip"):
        parse_idx(gzip.compress(_idx(a))[:-8] + b"garbage!")


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_headers_match_arrays():
    for name, magic, shape in [("t10k-images-idx3-ubyte.gz", 0x803, (10000, 28, 28)),
                               ("t10k-labels-idx1-ubyte.gz", 0x801, (10000,))]:
        raw = gzip.decompress((FMNIST / name).read_bytes())
        (m,) = struct.unpack(">I", raw[:4])
        dims = struct.unpack(f">{m & 0xFF}I", raw[4:4 + 4 * (m & 0xFF)])
        assert m == magic and dims == shape
        arr = read_idx(str(FMNIST / name))
        assert arr.shape == shape and arr.dtype == np.uint8
    labels = read_idx(str(FMNIST / "t10k-labels-idx1-ubyte.gz"))
    assert set(labels.tolist()) == set(range(10)) and np.bincount(labels).tolist() == [1000] * 10
