"""C2PA provenance: `aigc keys init`, every PNG written through aigckit.image.io signed, `aigc verify` valid on the
untouched file and invalid (exit 1, "valid": false) after a pixel edit, a metadata edit, or stripping."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from PIL import Image

from aigckit.cli import main
from aigckit.image import io as image_io
from aigckit.trust.provenance import DIGITAL_SOURCE_TYPE, install, verify


def _chunks(data: bytes):
    pos = 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        yield pos, data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n


def _replace_chunk(data: bytes, kind: bytes, fn, prefix: bytes = b"") -> bytes:
    """The PNG with the first chunk of ``kind`` (starting with ``prefix``) rewritten by ``fn`` (valid CRC: only the
    content changes)."""
    for pos, k, body in _chunks(data):
        if k == kind and body.startswith(prefix):
            new = fn(body)
            chunk = struct.pack(">I", len(new)) + k + new + struct.pack(">I", zlib.crc32(k + new) & 0xFFFFFFFF)
            return data[:pos] + chunk + data[pos + 12 + len(body):]
    raise AssertionError(f"no {kind!r} chunk")


def _flip_pixel(idat: bytes) -> bytes:
    raw = bytearray(zlib.decompress(idat))
    raw[len(raw) // 2] ^= 0x01  # one grey level of one pixel
    return zlib.compress(bytes(raw))


@pytest.fixture()
def keys(tmp_path, monkeypatch, capsys):
    d = tmp_path / "keys"
    monkeypatch.setenv("AIGC_KEYS", str(d))
    assert main(["keys", "init"]) == 0
    assert main(["keys", "init"]) == 2  # never overwrites without --force
    capsys.readouterr()
    assert (d / "c2pa-signer.key").stat().st_mode & 0o077 == 0
    return d


def test_sign_verify_and_tamper(keys, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(image_io, "PIXEL_HOOKS", [])
    monkeypatch.setattr(image_io, "FILE_HOOKS", [])
    install()
    img = Image.effect_noise((160, 160), 40).convert("L")
    path = image_io.save_png(img, tmp_path / "gen.png", {"model": "ddpm", "seed": 7, "class": "bag", "steps": 20})
    assert main(["verify", str(path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["valid"] and res["trusted"] and res["state"] == "Trusted"
    m = res["manifest"]
    assert m["action"] == "c2pa.created" and m["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert m["software_agent"]["name"] == "aigckit"
    assert m["parameters"]["seed"] == 7 and m["parameters"]["class"] == "bag"
    assert res["watermark"]["found"] and res["watermark"]["payload"] == m["parameters"]["watermark_payload"]

    data = path.read_bytes()
    pixel = tmp_path / "pixel.png"
    pixel.write_bytes(_replace_chunk(data, b"IDAT", _flip_pixel))
    text = tmp_path / "text.png"
    text.write_bytes(_replace_chunk(data, b"tEXt", lambda b: b.replace(b"7", b"8"), b"seed\0"))
    stripped = tmp_path / "stripped.png"
    with Image.open(path) as im:
        im.save(stripped)  # PIL drops the manifest chunk; the pixels (and the invisible watermark) stay
    for bad in (pixel, text, stripped):
        assert main(["verify", str(bad), "--json"]) == 1, bad
        res = json.loads(capsys.readouterr().out)
        assert res["valid"] is False
    assert verify(pixel)["failures"] and verify(stripped)["manifest"] is None
    assert verify(stripped)["watermark"]["found"]  # what the manifest does not survive, the mark does
    assert main(["verify", str(pixel)]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_no_keys_no_signature(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIGC_KEYS", str(tmp_path / "none"))
    monkeypatch.setattr(image_io, "PIXEL_HOOKS", [])
    monkeypatch.setattr(image_io, "FILE_HOOKS", [])
    install()
    path = image_io.save_png(Image.new("L", (32, 32), 5), tmp_path / "plain.png", {"seed": 1})
    assert image_io.read_png_metadata(path)["seed"] == "1"
    assert main(["verify", str(path)]) == 1
    assert "no valid C2PA manifest" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "missing.png")]) == 2


def test_pixels_that_do_not_decode_are_invalid_not_a_traceback(keys, tmp_path, capsys, monkeypatch):
    # a tampered IDAT chunk may leave a zlib stream PIL cannot read: verify says invalid (exit 1)
    from aigckit.trust import imagemark

    monkeypatch.setattr(image_io, "PIXEL_HOOKS", [])
    monkeypatch.setattr(image_io, "FILE_HOOKS", [])
    install()
    path = image_io.save_png(Image.new("L", (160, 160), 9), tmp_path / "gen.png", {"seed": 3})

    def broken(*_a, **_k):
        raise OSError("unrecognized data stream contents when reading image file")

    monkeypatch.setattr(imagemark, "decode_file", broken)
    assert main(["verify", str(path), "--json"]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["valid"] is False and res["watermark"]["found"] is False
