"""What serving LoRA adapters side by side (``load_lm(adapters=...)``, ``aigc serve --adapter``) costs per token,
against the same adapter merged into the weights at load (``load_lm(adapter=...)``) and the base model alone.

Rows, SmolLM2-135M-Instruct float32, one random rank-R adapter on all seven linears per block (peft layout):

* base:    greedy decode of the base model (fused decode kernels)
* merged:  the adapter merged at load (same kernels as base: the fastest way to run ONE adapter)
* served:  ``lm.with_adapter(name)``: the unmerged adapter on the shared base (per-module path + LoRA matmuls)
* batch:   the scheduler decoding B requests at once, all base / half on the adapter / all on the adapter

Interleaved rounds (each side keeps its best: the VM is shared).

    .venv/bin/python bench/adapter_speed.py --threads 2 --rounds 3 --tokens 48
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_GGUF = Path(os.environ.get("AIGC_HOME", Path.home() / ".cache/aigckit")) / \
    "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a robot who learns to paint."


def make_adapter(model_path: str, out: Path, rank: int) -> Path:
    from aigckit.text.lm import load_lm
    from aigckit.tune.lora import LoraConfig, add_lora, lora_parameters, save_adapter

    lm = load_lm(model_path, kernels="torch")
    cfg = LoraConfig(r=rank, alpha=2 * rank)
    add_lora(lm.model, cfg, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(lm.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return save_adapter(lm.model, out, cfg, model_path)


def decode_tps(lm, ids, tokens: int) -> float:
    t0 = time.perf_counter()
    out = lm.generate(ids, max_new_tokens=tokens, temperature=0, ignore_eos=True)
    return len(out.token_ids) / (time.perf_counter() - t0)


def batch_tps(sched, ids, tokens: int, adapters: list) -> float:
    from aigckit.text.params import GenerationParams

    p = GenerationParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    handles = [sched.submit(ids, p, adapter=a) for a in adapters]
    n = sum(1 for h in handles for ev in h if ev.token_id is not None)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_GGUF))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from aigckit.text.lm import load_lm
    from aigckit.text.scheduler import Scheduler

    with tempfile.TemporaryDirectory() as tmp:
        ad = make_adapter(a.model, Path(tmp) / "ad", a.rank)
        lm = load_lm(a.model, adapters={"ad": ad}, threads=a.threads)
        served = lm.with_adapter("ad")
        merged = load_lm(a.model, adapter=ad, threads=a.threads)
        ids = lm.encode(PROMPT)
        assert served.generate(ids, max_new_tokens=16, temperature=0).token_ids == \
            merged.generate(ids, max_new_tokens=16, temperature=0).token_ids
        sched = Scheduler(lm, max_batch=a.batch)
        half = ["ad" if i % 2 else None for i in range(a.batch)]
        sides = {"base": lambda: decode_tps(lm, ids, a.tokens), "merged": lambda: decode_tps(merged, ids, a.tokens),
                 "served": lambda: decode_tps(served, ids, a.tokens),
                 f"batch{a.batch} base": lambda: batch_tps(sched, ids, a.tokens, [None] * a.batch),
                 f"batch{a.batch} half adapter": lambda: batch_tps(sched, ids, a.tokens, half),
                 f"batch{a.batch} all adapter": lambda: batch_tps(sched, ids, a.tokens, ["ad"] * a.batch)}
        for f in sides.values():
            f()  # warm-up (numba compiles, workspaces)
        best = {k: 0.0 for k in sides}
        for _ in range(a.rounds):
            for k, f in sides.items():
                best[k] = max(best[k], f())
        sched.close()
    from aigckit.text.multilora import RowLoraLinear

    extra = sum(int(p.A.count_nonzero() + p.B.count_nonzero()) for m in lm.adapters.model.modules()
                if isinstance(m, RowLoraLinear) for p in m.parts if p is not None)
    from aigckit.text.adapter import lora_targets

    shapes = {t.module: (max(t.row0 + t.rows for u in lora_targets(lm.config) if u.module == t.module), t.cols)
              for t in lora_targets(lm.config)}
    copy = sum(o * i for o, i in shapes.values())  # what a merged copy of every adapted linear would hold
    res = {"model": a.model, "rank": a.rank, "threads": a.threads, "tokens": a.tokens, "tok_s": best,
           "adapter_numbers": extra, "merged_copy_numbers": copy}
    for k, v in best.items():
        print(f"{k:>24}: {v:7.1f} tok/s")
    print(f"per adapter: {extra:,} numbers (A, B) where a merged copy of the adapted linears would hold {copy:,}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
