"""Latent vs pixel diffusion, side by side: training images/s (read from each run's metrics.jsonl: the two runs
trained at the same time, one thread each, so they shared the machine alike) and sampling seconds per image
(measured here, the two models alternating round by round, the median kept).

    python docs/multimodal/ldm_vs_pixel.py PIXEL_RUN LDM_RUN [--n 10] [--steps 20] [--guidance 3] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

p = argparse.ArgumentParser()
p.add_argument("runs", nargs=2, help="pixel run, ldm run")
p.add_argument("--n", type=int, default=10, help="images per timed sampling call")
p.add_argument("--steps", type=int, default=20, help="DDIM steps")
p.add_argument("--guidance", type=float, default=3.0)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads)

from aigckit.image.api import load_image_model  # noqa: E402

models = {r: load_image_model(r) for r in a.runs}
prompts = ["a pair of trainers", "a dark coat"]
for m in models.values():  # warm-up (text encoder load, first-call allocations)
    m.sample(2, prompts=prompts, steps=2, guidance=a.guidance, seed=0)
times: dict[str, list[float]] = {r: [] for r in a.runs}
for k in range(a.rounds):
    for r, m in models.items():
        t0 = time.perf_counter()
        m.sample(a.n, prompts=prompts, steps=a.steps, guidance=a.guidance, seed=k)
        times[r].append((time.perf_counter() - t0) / a.n)
for r, m in models.items():
    rows = [json.loads(line) for line in (Path(r) / "metrics.jsonl").read_text().splitlines()]
    ips = [row["images_per_s"] for row in rows]
    params = sum(p.numel() for p in m.model.unet.parameters())
    print(json.dumps({"run": r, "family": m.family, "unet_parameters": params, "steps_trained": rows[-1]["step"],
                      "train_seconds": rows[-1]["time"], "train_images_per_s_median": statistics.median(ips),
                      "train_images_per_s_overall": round(rows[-1]["images"] / rows[-1]["time"], 2),
                      "sample_seconds_per_image_median": round(statistics.median(times[r]), 4),
                      "sample_seconds_per_image_all": [round(t, 4) for t in times[r]], "ddim_steps": a.steps,
                      "guidance": a.guidance, "threads": a.threads, "load_average": os.getloadavg()}), flush=True)
