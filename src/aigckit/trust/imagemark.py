"""An invisible, keyed image watermark that survives what a manifest does not: re-encoding, metadata stripping,
resizing, cropping. Spread spectrum on the luminance, written for this project (no library).

Symbols:

    N = 128     the canonical frame: the image's luminance resized to N x N
    G = 32      cells per side: the frame is cut into G x G cells of N/G pixels (1/32 of the image side each)
    B = 48      payload bits: a 16-bit magic (0xA16C) + a 32-bit id (a hash of the generation metadata)
    delta       the lattice step in grey levels (default 10: PSNR about 37 dB)

The secret key assigns the G*G cells to the B bits (21 cells each, the rest unused) and gives each cell a dither.
Embedding is quantisation index modulation (Chen & Wornell 2001) on cell means: each cell's mean luminance moves
to the nearest point of its bit's lattice ``delta * (Z + dither_c + bit / 2)`` (a smooth bilinear pattern of the
image's own size, corrected over a few embed-and-measure rounds; RGB images: Y of YCbCr, chroma kept). Unlike
additive spread spectrum, the image itself does not interfere with the decision, which matters on the sharp,
black-backed Fashion-MNIST grids this project generates. Decoding resizes Y to the frame, measures the cells and
takes a soft majority vote of each bit's cells. A crop moves the frame: the decoder also tries crops to 95% and 90%
of each side anchored at the centre, the corners and the edge middles, and keeps the hypothesis whose magic
matches with the best lattice fit. "Found" means the 16 magic bits decode exactly (per hypothesis a chance of
2**-16 on unmarked images; 19 hypotheses). Measured robustness (docs/TRUST.md): JPEG down to quality 50 and
resizing x0.5 survive; crops survive only when they land on a hypothesis to about half a frame pixel.

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
DELTA = 10.0  # lattice step in grey levels (the largest change per cell is delta / 2 plus corrections)


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


def _cell_means(frame: np.ndarray) -> np.ndarray:
    return frame.reshape(G, N // G, G, N // G).mean(axis=(1, 3))


def _dither(secret: str) -> np.ndarray:
    """A keyed offset per cell in [0, 1) (fraction of the lattice step)."""
    seed = int.from_bytes(hashlib.blake2b(secret.encode(), digest_size=16, person=b"aigc-dither").digest(), "little")
    return np.random.Generator(np.random.PCG64(seed)).uniform(0, 1, (G, G))


def embed(y: np.ndarray, secret: str, payload: int, delta: float = DELTA, rounds: int = 6) -> np.ndarray:
    """Luminance ``y`` (H x W, 0..255 float) with the payload added.

    Quantisation index modulation per cell: the mean of each cell of bit b moves to the nearest point of the
    lattice ``delta * (Z + dither_c + b / 2)``, so the image itself never interferes with the decision (unlike
    additive spread spectrum); the decoder votes over each bit's cells, so a crop that loses some cells or a
    few cells pushed across by JPEG leave the bit intact. The smooth pattern's effect on the cell means is
    measured and corrected over a few rounds (clipping at black and white included)."""
    if not 0 <= payload < 1 << BITS:
        raise AigcError(f"payload must be a {BITS}-bit integer", param="payload")
    owner, _ = _layout(secret)
    used = owner >= 0
    bits = np.where(used, _bits_of(payload)[np.maximum(owner, 0)], 0).astype(np.float64)
    off = (_dither(secret) + bits / 2) * delta
    h, w = y.shape
    cells = _cell_means(_resize(y, N, N))
    target = np.round((cells - off) / delta) * delta + off  # the nearest lattice point of each cell
    shift = np.zeros((G, G))
    out = y
    for i in range(rounds):
        if i:
            cells = _cell_means(_resize(out, N, N))
        err = np.where(used, target - cells, 0.0)
        if np.abs(err).max() < 0.05 * delta:
            break
        shift += err * 1.5
        out = np.clip(y + _resize(shift.astype(np.float32), w, h), 0, 255)
    return out


def _votes(cells: np.ndarray, mask: np.ndarray, secret: str, delta: float) -> np.ndarray:
    """Per bit: the sum over its cells (inside ``mask``) of a soft vote in [-1, 1] (+1 = bit 1 on its lattice)."""
    owner, _ = _layout(secret)
    u = (cells / delta - _dither(secret)) * 2  # near an even integer -> 0, odd -> 1
    k = np.round(u)
    soft = np.where(k.astype(np.int64) % 2 == 1, 1.0, -1.0) * (1 - 2 * np.abs(u - k))
    ok = (owner >= 0) & mask
    return np.bincount(owner[ok], weights=soft[ok], minlength=BITS)


CROPS = (0.95, 0.9)  # crop scales the decoder tries (each at the centre, the corners and the edge middles)


def decode(y: np.ndarray, secret: str, search: bool = True, delta: float = DELTA) -> dict:
    """Decode the payload from luminance ``y`` (any size): the best frame hypothesis, its bits and whether the
    magic matched. Frame hypotheses: the whole image, then crops to ``CROPS`` of each side, anchored at the
    centre, a corner or an edge middle (placed at a quarter of a frame pixel's precision)."""
    hyps = [(1.0, 0.0, 0.0)]
    if search:
        hyps += [(c, fx * (1 - c), fy * (1 - c)) for c in CROPS for fx in (0.0, 0.5, 1.0) for fy in (0.0, 0.5, 1.0)]
    F = 4 * N  # the hypothesis canvas: cells of 16 x 16
    best = None
    for s, fx, fy in hyps:
        if s == 1.0:  # measured as the embedder measures
            cells, full = _cell_means(_resize(y, N, N)), np.ones((G, G), dtype=bool)
        else:
            m, ox, oy = int(round(F * s)), int(round(F * fx)), int(round(F * fy))
            frame = np.zeros((F, F), dtype=np.float32)
            covered = np.zeros((F, F), dtype=bool)
            frame[oy:oy + m, ox:ox + m] = _resize(y, m, m)
            covered[oy:oy + m, ox:ox + m] = True
            full = covered.reshape(G, F // G, G, F // G).all(axis=(1, 3))
            cells = frame.reshape(G, F // G, G, F // G).mean(axis=(1, 3))
        v = _votes(cells, full, secret, delta)
        bits = (v > 0).astype(np.int64)
        payload = int("".join(map(str, bits)), 2)
        key = (payload >> 32 == MAGIC, float(np.abs(v).sum() / max(1, full.sum())))
        if best is None or key > best[0]:
            best = (key, payload, bits, (s, fx, fy))
        if s == 1.0 and key[0] and key[1] > 0.3:
            break  # an uncropped, clearly marked image: no search needed
    (magic_ok, fit), payload, bits, hyp = best
    return {"found": bool(magic_ok), "payload": f"{payload:012x}", "id": f"{payload & 0xFFFFFFFF:08x}",
            "bits": "".join(map(str, bits)), "frame": {"scale": hyp[0], "x": round(hyp[1], 3), "y": round(hyp[2], 3)},
            "fit": round(fit, 3)}


def _luma(image) -> tuple[np.ndarray, object]:
    if image.mode == "L":
        return np.asarray(image, dtype=np.float32), None
    ycc = image.convert("RGB").convert("YCbCr")
    return np.asarray(ycc.getchannel(0), dtype=np.float32), ycc


def embed_image(image, secret: str, payload: int, delta: float = DELTA):
    """A PIL image with the payload in its luminance (unchanged when smaller than ``MIN_SIDE``)."""
    from PIL import Image

    if min(image.size) < MIN_SIDE:
        return image
    y, ycc = _luma(image)
    y2 = np.round(embed(y, secret, payload, delta)).astype(np.uint8)
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
