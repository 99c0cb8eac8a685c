"""An invisible, keyed image watermark that survives what a manifest does not: re-encoding, metadata stripping,
cropping, resizing. Quantisation index modulation on block means of the luminance, written for this project (no
library).

Symbols:

    B = 8       block side in pixels: the image is cut into B x B blocks from its top-left corner
    T = 10      the tile: T x T blocks (80 x 80 pixels) repeated over the whole image
    BITS = 48   payload bits: a 16-bit magic (0xA16C) + a 32-bit id (a hash of the generation metadata)
    delta       the lattice step in grey levels (default 10: PSNR about 36 dB on generated grids)

The secret key gives each of the tile's T*T positions an owner bit (two positions per bit, four unused) and a
dither in [0, 1). Embedding is quantisation index modulation (Chen & Wornell 2001) on block means: the mean
luminance of each block moves to the nearest point of its bit's lattice ``delta * (Z + dither + bit / 2)`` by a
constant added to the block (the least change for a given mean: about 1 dB better PSNR than a smooth pattern, and
aligned with JPEG's 8 x 8 DCT blocks, where it is the DC term), corrected over a few embed-and-measure rounds for
clipping at black and white (RGB images: Y of YCbCr, chroma kept). QIM leaves no host interference, which matters
on the sharp, black-backed grids this project generates.

Because the tile repeats and the blocks are anchored in pixels, a crop (of any size, anywhere, keeping at least a
tile or so) only moves the grid: the decoder tries every pixel offset (B x B) and every tile shift (T x T) and
keeps the hypothesis whose votes fit the lattice best. Resizing changes the block size: the decoder also tries the
scales in ``SCALES`` (a halved image is read in 4 x 4 blocks in place, a doubled one in 16 x 16; other factors
are resampled back first). Hypotheses are ranked on the central blocks first, the best
few confirmed on all blocks; "found" means the 16 magic bits decode exactly at the best hypothesis (a chance of
about 2**-16 per unmarked image, measured in docs/TRUST.md). Each bit is voted by every block it owns (18 in a
242 x 242 grid), so JPEG down to quality 50 leaves it intact. Not covered: rescaling by factors outside
``SCALES``, rotation, and crops that also rescale.

Images smaller than ``MIN_SIDE`` pixels on a side are not marked (a 28 x 28 sample has too few blocks for 48 bits);
grids of them are.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from aigckit.errors import AigcError

__all__ = ["embed", "decode", "embed_image", "decode_image", "decode_file", "payload_for", "psnr", "MAGIC", "BITS",
           "MIN_SIDE", "SCALES"]

B, T, BITS, MAGIC_BITS = 8, 10, 48, 16
MAGIC = 0xA16C
MIN_SIDE = 96
DELTA = 10.0  # lattice step in grey levels (the largest change of a block mean is delta / 2)
SCALES = (2.0, 1.5, 4 / 3, 1.25, 0.8, 0.75, 0.5)  # besides 1: the image rescaled by these before the search
SCREEN = 2 * T  # hypotheses are ranked on the central SCREEN x SCREEN blocks ...
CONFIRM = 4  # ... and the best CONFIRM confirmed on all blocks
STRONG = 20.0  # a confirmed fit (z-score, see _votes) above this with the magic ends the search early


@lru_cache(maxsize=8)
def _tile(secret: str) -> tuple[np.ndarray, np.ndarray]:
    """(owner bit per tile position [T, T], -1 = unused; dither per position [T, T] in [0, 1)), from the secret
    (numpy's PCG64 seeded by a keyed hash: the same on every machine)."""
    seed = int.from_bytes(hashlib.blake2b(secret.encode(), digest_size=16, person=b"aigc-imark2").digest(), "little")
    rng = np.random.Generator(np.random.PCG64(seed))
    per = (T * T) // BITS
    owner = np.full(T * T, -1, dtype=np.int64)
    cells = rng.permutation(T * T)
    for b in range(BITS):
        owner[cells[b * per:(b + 1) * per]] = b
    return owner.reshape(T, T), rng.uniform(0, 1, (T, T))


@lru_cache(maxsize=32)
def _shifted(secret: str, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """For every tile shift s = (ty, tx) (T*T of them): the bincount index of each of ny x nx blocks
    (s * (BITS + 1) + owner + 1; 0 = unused) and its dither, [T*T, ny, nx] each. Block (i, j) under shift s sits
    at tile position ((i + ty) % T, (j + tx) % T)."""
    owner, dither = _tile(secret)
    i = np.arange(ny)[:, None]
    j = np.arange(nx)[None, :]
    idx = np.empty((T * T, ny, nx), dtype=np.int64)
    dit = np.empty((T * T, ny, nx))
    for ty in range(T):
        for tx in range(T):
            s = ty * T + tx
            pos = ((i + ty) % T, (j + tx) % T)
            idx[s] = s * (BITS + 1) + owner[pos] + 1
            dit[s] = dither[pos]
    return idx, dit


def _bits_of(payload: int) -> np.ndarray:
    return np.array([(payload >> (BITS - 1 - i)) & 1 for i in range(BITS)], dtype=np.int64)


def payload_for(metadata: dict | None) -> int:
    """48 bits: the magic, then 32 bits of a hash of the metadata (links a marked image to its manifest)."""
    h = hashlib.blake2b(json.dumps(metadata or {}, sort_keys=True, default=str).encode(), digest_size=4).digest()
    return (MAGIC << 32) | int.from_bytes(h, "big")


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def _block_means(y: np.ndarray, dy: int = 0, dx: int = 0, b: int = B) -> np.ndarray:
    """Means of the whole b x b blocks of ``y`` starting at pixel (dy, dx)."""
    ny, nx = (y.shape[0] - dy) // b, (y.shape[1] - dx) // b
    return y[dy:dy + ny * b, dx:dx + nx * b].reshape(ny, b, nx, b).mean(axis=(1, 3))


def _pattern(shift: np.ndarray, h: int, w: int) -> np.ndarray:
    """An image of size h x w: each block's shift over the whole block (zero outside whole blocks)."""
    ny, nx = shift.shape
    up = np.kron(shift, np.ones((B, B), dtype=np.float32))
    return np.pad(up, ((0, h - ny * B), (0, w - nx * B)))


def embed(y: np.ndarray, secret: str, payload: int, delta: float = DELTA, rounds: int = 10) -> np.ndarray:
    """Luminance ``y`` (H x W, 0..255 float) with the payload added (see the module docstring)."""
    if not 0 <= payload < 1 << BITS:
        raise AigcError(f"payload must be a {BITS}-bit integer", param="payload")
    h, w = y.shape
    cells = _block_means(y)
    idx, dit = _shifted(secret, *cells.shape)
    owner = idx[0] - 1  # shift 0: the tile starts at the top-left block
    used = owner >= 0
    bits = np.where(used, _bits_of(payload)[np.maximum(owner, 0)], 0)
    off = (dit[0] + bits / 2) * delta
    target = np.round((cells - off) / delta) * delta + off  # the nearest lattice point of each block
    target = np.where(target < 0, target + delta, np.where(target > 255, target - delta, target))
    shift = np.zeros(cells.shape)
    out = y
    for i in range(rounds):
        if i:
            cells = _block_means(out)
        err = np.where(used, target - cells, 0.0)
        if np.abs(err).max() < 0.04 * delta:
            break
        shift += err * 1.2
        out = np.clip(y + _pattern(shift, h, w), 0, 255)
    return out


def _votes(cells: np.ndarray, secret: str, delta: float, shifts: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Per tile shift: per bit the sum over its blocks of a soft vote in [-1, 1] (+1 = bit 1 on its lattice)
    [S, BITS], and the fit [S]: a z-score of how far the votes are from chance. Without a mark a block's vote is
    uniform on [-1, 1], so a bit voted by n blocks has E[v^2] = n/3 and Var[v^2] = 2n^2/9 - 2n/15, whatever the
    hypothesis: fits of grids with different block counts (crops, scales) compare. ``shifts`` limits the shifts
    tried."""
    idx, dit = _shifted(secret, *cells.shape)
    if shifts is not None:
        idx, dit = idx[shifts], dit[shifts]
    u = (cells[None] / delta - dit) * 2  # near an even integer -> bit 0, odd -> bit 1
    k = np.round(u)
    soft = np.where(k.astype(np.int64) % 2 == 1, 1.0, -1.0) * (1 - 2 * np.abs(u - k))
    s_all = np.arange(T * T) if shifts is None else np.asarray(shifts)
    local = idx - (s_all * (BITS + 1))[:, None, None] + (np.arange(len(s_all)) * (BITS + 1))[:, None, None]
    v = np.bincount(local.ravel(), soft.ravel(), minlength=len(s_all) * (BITS + 1)).reshape(len(s_all), BITS + 1)
    n = np.bincount(local.ravel(), minlength=len(s_all) * (BITS + 1)).reshape(len(s_all), BITS + 1)[:, 1:]
    v = v[:, 1:]
    var = (2 * n * n / 9 - 2 * n / 15).sum(axis=1)
    return v, ((v * v).sum(axis=1) - n.sum(axis=1) / 3) / np.sqrt(np.maximum(var, 1e-9))


def _centre(cells: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The central SCREEN x SCREEN blocks (all if fewer) and the block offset of that window."""
    ny, nx = cells.shape
    oy, ox = max(0, (ny - SCREEN) // 2), max(0, (nx - SCREEN) // 2)
    return cells[oy:oy + SCREEN, ox:ox + SCREEN], oy, ox


def _result(v: np.ndarray, fit: float, hyp: tuple) -> dict:
    bits = (v > 0).astype(np.int64)
    payload = int("".join(map(str, bits)), 2)
    s, dy, dx, shift = hyp
    return {"found": bool(payload >> 32 == MAGIC), "payload": f"{payload:012x}", "id": f"{payload & 0xFFFFFFFF:08x}",
            "bits": "".join(map(str, bits)), "fit": round(float(fit), 2),
            "registration": {"scale": round(s, 4), "dy": dy, "dx": dx, "tile_shift": [shift // T, shift % T]}}


def decode(y: np.ndarray, secret: str, search: bool = True, delta: float = DELTA) -> dict:
    """Decode the payload from luminance ``y`` (any size): the best registration hypothesis, its bits and whether
    the magic matched. ``search=False`` tries only the unmoved grid (an image as it was written)."""
    if not search:
        v, fit = _votes(_block_means(y), secret, delta, np.array([0]))
        return _result(v[0], fit[0], (1.0, 0, 0, 0))
    best = None
    for s in (1.0, *SCALES):
        b = B
        if s == 1.0 or float(B / s).is_integer():  # a halved image: B/2-pixel blocks in place, no resampling
            ys, b = y, int(B / s)
        else:
            ys = _resize(y, max(1, round(y.shape[1] * s)), max(1, round(y.shape[0] * s)))
        if min(ys.shape) < 2 * b:
            continue
        screened = []
        for dy in range(b):
            for dx in range(b):
                cells = _block_means(ys, dy, dx, b)
                win, oy, ox = _centre(cells)
                _, fit = _votes(win, secret, delta)
                for k in np.argsort(fit)[-CONFIRM:]:
                    # the window's shift k is shift k - (oy, ox) for the whole grid
                    ty, tx = divmod(int(k), T)
                    screened.append((float(fit[k]), dy, dx, ((ty - oy) % T) * T + (tx - ox) % T))
        for _, dy, dx, shift in sorted(screened, reverse=True)[:CONFIRM]:
            v, fit = _votes(_block_means(ys, dy, dx, b), secret, delta, np.array([shift]))
            res = _result(v[0], fit[0], (s, dy, dx, shift))
            if best is None or res["fit"] > best["fit"]:  # the magic is checked at the best fit only
                best = res
        if best is not None and best["found"] and best["fit"] > STRONG:
            break
    return best if best is not None else {"found": False, "note": "image too small to decode"}


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
