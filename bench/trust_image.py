"""The invisible image watermark (aigckit.trust.imagemark): PSNR and bit accuracy / detection under attacks.

Images: 8 x 8 grids of Fashion-MNIST test images (242 x 242 grey, the shape `aigc image sample` writes), and the
same grids as RGB upscaled x2 (484 x 484). Attacks: none, JPEG quality 90/75/50, resize x0.5, crop 10% (the
central 90% of each side, and the top-left 90%), JPEG 75 after resize x0.5. "found" = the 16-bit magic decodes
exactly and the whole payload is right ("found_exact"); bit accuracy over all 48 bits; false positives counted on the unmarked grids with the same key.

    nice -n 10 .venv/bin/python bench/trust_image.py --n 24 --json bench/trust_image.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def grids(n: int, size: int = 8) -> list:
    from aigckit.data.images import load_dataset

    ds = load_dataset("fashion-mnist", split="test")
    x = ds.images[:, 0].numpy()  # N x 28 x 28 uint8
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        idx = rng.choice(len(x), size * size, replace=False)
        g = np.zeros((size * 30 + 2, size * 30 + 2), dtype=np.uint8)
        for k, i in enumerate(idx):
            r, c = divmod(k, size)
            g[2 + r * 30:2 + r * 30 + 28, 2 + c * 30:2 + c * 30 + 28] = x[i]
        out.append(Image.fromarray(g, mode="L"))
    return out


def jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)


def crop(im, frac, where):
    w, h = im.size
    cw, ch = int(w * (1 - frac)), int(h * (1 - frac))
    x0, y0 = ((w - cw) // 2, (h - ch) // 2) if where == "center" else (0, 0)
    return im.crop((x0, y0, x0 + cw, y0 + ch))


ATTACKS = {
    "none": lambda im: im,
    "jpeg90": lambda im: jpeg(im, 90),
    "jpeg75": lambda im: jpeg(im, 75),
    "jpeg50": lambda im: jpeg(im, 50),
    "resize0.5": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "crop10_center": lambda im: crop(im, 0.1, "center"),
    "crop10_corner": lambda im: crop(im, 0.1, "corner"),
    "crop30_corner": lambda im: crop(im, 0.3, "corner"),
    "resize0.5+jpeg75": lambda im: jpeg(im.resize((im.width // 2, im.height // 2), Image.BILINEAR), 75),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--delta", type=float, default=None, help="lattice step (default imagemark.DELTA)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from aigckit.trust import imagemark as im_

    delta = args.delta or im_.DELTA
    t0 = time.time()
    secret = "bench-image-secret"
    res: dict = {"delta": delta, "n": args.n}
    base = grids(args.n)
    sets = {"grey242": base, "rgb484": [g.convert("RGB").resize((g.width * 2, g.height * 2), Image.BICUBIC)
                                        for g in base]}
    rng = np.random.default_rng(1)
    for name, imgs in sets.items():
        payloads = [int(im_.MAGIC << 32 | int(rng.integers(0, 2 ** 32))) for _ in imgs]
        marked = [im_.embed_image(g, secret, p, delta) for g, p in zip(imgs, payloads)]
        ps = [im_.psnr(np.asarray(a.convert("L") if a.mode == "L" else a, dtype=np.float64),
                       np.asarray(b.convert("L") if b.mode == "L" else b, dtype=np.float64))
              for a, b in zip(imgs, marked)]
        row = {"psnr_db": float(np.mean(ps))}
        for att, fn in ATTACKS.items():
            acc, found = [], []
            for m, p in zip(marked, payloads):
                d = im_.decode(np.asarray(fn(m).convert("L"), dtype=np.float32), secret, delta=delta)
                want = im_._bits_of(p)
                got = np.array([int(c) for c in d["bits"]])
                acc.append(float((want == got).mean()))
                found.append(d["found"] and int(d["payload"], 16) == p)
            row[att] = {"bit_acc": round(float(np.mean(acc)), 4), "found_exact": float(np.mean(found))}
        fp = [im_.decode_image(ATTACKS["jpeg75"](g), secret)["found"] for g in imgs]
        row["false_positive_unmarked"] = float(np.mean(fp))
        res[name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
