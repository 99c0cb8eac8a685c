"""Training metrics: appended to ``metrics.jsonl`` (one JSON object per logged step) and plotted to ``curves.png``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume: drop rows logged after the checkpoint we resume from, so curves do not double back."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    p = Path(run_dir) / "metrics.jsonl"
    if p.exists():
        tmp = p.with_name(f".metrics.jsonl.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, p)


def plot_curves(run_dir: Path, keys: list[str] | None = None, width: int = 360, height: int = 220) -> Path | None:
    """One small panel per metric (loss curves, images/s) against step, drawn with Pillow; returns the PNG path."""
    from PIL import Image, ImageDraw

    rows = read_metrics(run_dir)
    if len(rows) < 2:
        return None
    keys = keys or [k for k in rows[-1] if k not in ("step", "time", "epoch", "images") and
                    isinstance(rows[-1][k], (int, float))]
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    img = Image.new("RGB", (cols * width, nrows * height), "white")
    d = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        ox, oy = (i % cols) * width, (i // cols) * height
        left, top, right, bottom = ox + 50, oy + 20, ox + width - 10, oy + height - 25
        d.rectangle([left, top, right, bottom], outline="black")
        d.text((left, oy + 5), key, fill="black")
        if len(pts) < 2:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) or 1
        y0, y1 = min(ys), max(ys)
        if y1 == y0:
            y1 = y0 + 1e-9
        d.text((ox + 2, top), f"{y1:.3g}", fill="gray")
        d.text((ox + 2, bottom - 10), f"{y0:.3g}", fill="gray")
        d.text((left, bottom + 5), f"{x0}", fill="gray")
        d.text((right - 40, bottom + 5), f"{x1}", fill="gray")
        line = [(left + (x - x0) / max(x1 - x0, 1) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
                for x, y in pts]
        d.line(line, fill=(31, 119, 180), width=1)
    out = Path(run_dir) / "curves.png"
    tmp = out.with_name(f".curves.png.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out
