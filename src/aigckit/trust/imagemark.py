"""An invisible, keyed image watermark that survives what a manifest does not: re-encoding, metadata stripping,
resizing, cropping. Spread spectrum on the luminance, written for this project (no library).

Symbols:

    N = 128     the canonical frame: the image's luminance resized to N x N
    G = 32      cells per side: the frame is cut into G x G cells of N/G pixels (1/32 of the image side each)
    B = 48      payload bits: a 16-bit magic (0xA16C) + a 32-bit id (a hash of the generation metadata)
    alpha       amplitude in grey levels (default 3: PSNR about 40 dB)

The secret key permutes the G*G cells among the B bits (21 cells each, the rest unused) and gives each cell a
sign s_c. Embedding adds ``alpha * s_c * (2 b - 1)`` to every cell of bit b, as a smooth (bilinear) pattern of
the image's own size, to the luminance Y (RGB images: Y of YCbCr, chroma kept). Decoding resizes Y to the frame,
takes each cell's mean minus the mean of its 8 neighbours (the neighbours have random signs, so this removes the
image's own low frequencies and keeps the mark), and sums ``s_c * d_c`` over each bit's cells: the sign is the bit.
A crop moves the frame; the decoder tries the crops a user is likely to make (scales 1, 0.95, 0.9, offsets in
steps of 2 frame pixels) and keeps the one whose magic matches with the largest total correlation. "Found" means
the 16 magic bits decode exactly (per frame hypothesis a chance of 2**-16 on unmarked images).

Images smaller than ``MIN_SIDE`` pixels on a side are not marked (a 28 x 28 sample has too few pixels for 48
robust bits); grids of them are.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from aigckit.errors import AigcError

__all__ = ["embed", "decode", "embed_image", "decode_image", "decode_file", "payload_for", "psnr", "MAGIC", "BITS",
           "MIN_SIDE"]

N, G, BITS, MAGIC_BITS = 128, 32, 48, 16
MAGIC = 0xA16C
MIN_SIDE = 96
ALPHA = 3.0


@lru_cache(maxsize=8)
def _layout(secret: str) -> tuple[np.ndarray, np.ndarray]:
    """(bit index per cell [G, G], -1 = unused; sign per cell [G, G]) from the secret (numpy's PCG64 seeded by a
    hash: the same on every machine)."""
    seed = int.from_bytes(hashlib.blake2b(secret.encode(), digest_size=16, person=b"aigc-imark").digest(), "little")
    rng = np.random.Generator(np.random.PCG64(seed))
    per = (G * G) // BITS
    cells = rng.permutation(G * G)
    owner = np.full(G * G, -1, dtype=np.int64)
    for b in range(BITS):
        owner[cells[b * per:(b + 1) * per]] = b
    signs = rng.integers(0, 2, G * G) * 2 - 1
    return owner.reshape(G, G), signs.reshape(G, G).astype(np.float32)


def _bits_of(payload: int) -> np.ndarray:
    return np.array([(payload >> (BITS - 1 - i)) & 1 for i in range(BITS)], dtype=np.int64)


def payload_for(metadata: dict | None) -> int:
    """48 bits: the magic, then 32 bits of a hash of the metadata (links a marked image to its manifest)."""
    h = hashlib.blake2b(json.dumps(metadata or {}, sort_keys=True, default=str).encode(), digest_size=4).digest()
    return (MAGIC << 32) | int.from_bytes(h, "big")


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def _frame_scores(y: np.ndarray, secret: str) -> np.ndarray:
    """Mean signed score per cell of each bit, the whole image as the frame (no crop)."""
    owner, _ = _layout(secret)
    d, _ = _cell_scores(_resize(y, N, N), np.ones((G, G), dtype=bool))
    return _bit_scores(d, np.ones((G, G), dtype=bool), secret) / np.bincount(owner[owner >= 0], minlength=BITS)


def embed(y: np.ndarray, secret: str, payload: int, alpha: float = ALPHA, rounds: int = 4) -> np.ndarray:
    """Luminance ``y`` (H x W, 0..255 float) with the payload added.

    Informed embedding (improved spread spectrum): the image itself correlates with each bit's pattern, often more
    than the mark does; so the amplitude of each bit starts at alpha and is raised, over a few rounds of
    embed-and-measure, until every bit decodes from the marked image with a margin of at least alpha (capped at
    6 alpha; clipping at black and white is measured, not assumed away)."""
    if not 0 <= payload < 1 << BITS:
        raise AigcError(f"payload must be a {BITS}-bit integer", param="payload")
    owner, signs = _layout(secret)
    sgn = (2 * _bits_of(payload) - 1).astype(np.float64)
    amp = np.full(BITS, alpha)
    h, w = y.shape
    out = y
    for _ in range(rounds):
        cell = np.where(owner >= 0, signs * (sgn * amp)[np.maximum(owner, 0)], 0.0).astype(np.float32)
        out = np.clip(y + _resize(cell, w, h), 0, 255)
        margin = _frame_scores(out, secret) * sgn
        need = alpha - margin
        if (need <= 0).all():
            break
        amp = np.minimum(amp + np.maximum(need, 0) * 1.2, 6 * alpha)
    return out


def _cell_scores(frame: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell mean minus neighbour mean, over cells fully covered (``mask``)."""
    c = frame.reshape(G, N // G, G, N // G).mean(axis=(1, 3))
    pad = np.pad(c, 1, mode="edge")
    neigh = sum(pad[1 + dy:1 + dy + G, 1 + dx:1 + dx + G] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if dy or dx) / 8.0
    return c - neigh, mask


def _bit_scores(d: np.ndarray, mask: np.ndarray, secret: str) -> np.ndarray:
    owner, signs = _layout(secret)
    ok = (owner >= 0) & mask
    return np.bincount(owner[ok], weights=(signs * d)[ok], minlength=BITS)


def decode(y: np.ndarray, secret: str, search: bool = True) -> dict:
    """Decode the payload from luminance ``y`` (any size): the best frame hypothesis, its bits and whether the
    magic matched."""
    h, w = y.shape
    hyps = [(1.0, 0, 0)]
    if search:
        for s in (0.95, 0.9):
            m = int(round(N * s))
            hyps += [(s, ox, oy) for ox in range(0, N - m + 1, 2) for oy in range(0, N - m + 1, 2)]
    best = None
    for s, ox, oy in hyps:
        m = int(round(N * s))
        frame = np.zeros((N, N), dtype=np.float32)
        covered = np.zeros((N, N), dtype=bool)
        frame[oy:oy + m, ox:ox + m] = _resize(y, m, m)
        covered[oy:oy + m, ox:ox + m] = True
        # a cell counts only when it and its neighbours are inside the crop
        cov = covered.reshape(G, N // G, G, N // G).all(axis=(1, 3))
        cpad = np.pad(cov, 1, mode="constant")
        full = cov & cpad[:-2, 1:-1] & cpad[2:, 1:-1] & cpad[1:-1, :-2] & cpad[1:-1, 2:]
        d, _ = _cell_scores(frame, full)
        sc = _bit_scores(d, full, secret)
        bits = (sc > 0).astype(np.int64)
        payload = int("".join(map(str, bits)), 2)
        magic_ok = payload >> 32 == MAGIC
        key = (magic_ok, float(np.abs(sc).sum()))
        if best is None or key > best[0]:
            best = (key, payload, bits, sc, (s, ox, oy))
    (magic_ok, _), payload, bits, sc, hyp = best
    return {"found": bool(magic_ok), "payload": f"{payload:012x}", "id": f"{payload & 0xFFFFFFFF:08x}",
            "bits": "".join(map(str, bits)), "frame": {"scale": hyp[0], "x": hyp[1], "y": hyp[2]},
            "margin": float(np.abs(sc).min())}


def _luma(image) -> tuple[np.ndarray, object]:
    if image.mode == "L":
        return np.asarray(image, dtype=np.float32), None
    ycc = image.convert("RGB").convert("YCbCr")
    return np.asarray(ycc.getchannel(0), dtype=np.float32), ycc


def embed_image(image, secret: str, payload: int, alpha: float = ALPHA):
    """A PIL image with the payload in its luminance (unchanged when smaller than ``MIN_SIDE``)."""
    from PIL import Image

    if min(image.size) < MIN_SIDE:
        return image
    y, ycc = _luma(image)
    y2 = np.round(embed(y, secret, payload, alpha)).astype(np.uint8)
    if ycc is None:
        return Image.fromarray(y2, mode="L")
    _, cb, cr = ycc.split()
    return Image.merge("YCbCr", (Image.fromarray(y2, mode="L"), cb, cr)).convert("RGB")


def decode_image(image, secret: str, search: bool = True) -> dict:
    y, _ = _luma(image)
    return decode(y, secret, search)


def decode_file(path: str | Path, secret: str) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if min(im.size) < MIN_SIDE // 2:
            return {"found": False, "note": f"image smaller than {MIN_SIDE // 2} px: not marked"}
        return decode_image(im, secret)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
