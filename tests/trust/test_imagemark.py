"""The invisible image watermark: round trip, JPEG, crops anywhere, halving, nothing found on unmarked images or
with another key, small images left alone."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from aigckit.trust import imagemark as im_


def _grid(seed: int) -> Image.Image:
    """A 242 x 242 grey image like `aigc image sample` grids: blobs with sharp edges on black."""
    rng = np.random.default_rng(seed)
    a = np.zeros((242, 242), dtype=np.uint8)
    for r in range(8):
        for c in range(8):
            h, w = rng.integers(10, 28, 2)
            a[2 + r * 30:2 + r * 30 + h, 2 + c * 30:2 + c * 30 + w] = rng.integers(60, 250)
    noise = rng.normal(0, 12, a.shape)
    return Image.fromarray(np.clip(a + (a > 0) * noise, 0, 255).astype(np.uint8), mode="L")


def _jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)


def test_round_trip_and_robustness():
    payload = im_.payload_for({"seed": 3, "model": "ddpm"})
    assert payload >> 32 == im_.MAGIC
    for seed, mode in ((0, "L"), (1, "RGB")):
        img = _grid(seed).convert(mode)
        marked = im_.embed_image(img, "secret", payload)
        assert marked.size == img.size and marked.mode == mode
        assert im_.psnr(np.asarray(img, float), np.asarray(marked, float)) > 34
        for attacked in (marked, _jpeg(marked, 75)):
            d = im_.decode_image(attacked, "secret", search=False)
            assert d["found"] and int(d["payload"], 16) == payload
        # crops move the block grid and the tile: found at any offset (centre, corners, uneven, 30%)
        for box in ((12, 12, 230, 230), (0, 0, 217, 217), (25, 25, 242, 242), (13, 7, 182, 176), (5, 30, 200, 238)):
            d = im_.decode_image(marked.crop(box), "secret")
            assert d["found"] and int(d["payload"], 16) == payload, box
            assert d["registration"]["scale"] == 1.0
            assert (d["registration"]["dy"], d["registration"]["dx"]) == ((-box[1]) % im_.B, (-box[0]) % im_.B)
        # halving: found through the x2 hypothesis, most bits right on this noisy host (docs/TRUST.md: rates)
        d = im_.decode_image(marked.resize((121, 121), Image.BILINEAR), "secret")
        assert d["registration"]["scale"] == 2.0
        assert np.mean([int(b) for b in d["bits"]] == im_._bits_of(payload)) >= 0.85
        assert not im_.decode_image(marked, "other secret")["found"]
        assert not im_.decode_image(img, "secret")["found"]


def test_small_images_are_left_alone():
    small = Image.new("L", (28, 28), 40)
    assert im_.embed_image(small, "k", im_.payload_for({})) is small


def test_fit_is_a_z_score_near_zero_without_a_mark():
    """The fit compares hypotheses with different block counts: on noise it is a z-score near 0 for every grid
    size, on a marked image it is far above."""
    rng = np.random.default_rng(5)
    for side in (96, 160, 400):
        noise = rng.uniform(0, 255, (side, side)).astype(np.float32)
        _, fit = im_._votes(im_._block_means(noise), "k", im_.DELTA)
        assert abs(float(np.mean(fit))) < 2.0 and 0.3 < float(np.std(fit)) < 2.0 and fit.max() < 6, side
    y = np.asarray(_grid(2), dtype=np.float32)
    marked = np.round(im_.embed(y, "k", im_.payload_for({}))).astype(np.float32)
    _, fit = im_._votes(im_._block_means(marked), "k", im_.DELTA, np.array([0]))
    assert fit[0] > 50
