"""The KGW watermark and the zero-shot detector on SmolLM2-135M: detection power, text quality, robustness.

For each of N varied prompts the model writes 200 tokens twice, with and without the watermark (same seed), then:

* TPR at FPR 1e-3 and 1e-5: the share of watermarked texts whose exact p-value is at most the FPR (the test's
  false-positive rate is the FPR by construction; the empirical FPR is counted on the unwatermarked samples and on
  human text). Detection runs on the decoded text, re-tokenised, repeated n-grams ignored: what a user does.
* perplexity of both sets under the unwatermarked model, conditioned on the prompt (the watermark's cost);
* robustness: 10/20/30% of the generated tokens replaced by uniformly random tokens, TPR again;
* zero-shot (Fast-DetectGPT, analytic, SmolLM2 as sampler and scorer): AUROC of unwatermarked model text vs human
  text, and the threshold with the best balanced accuracy (the calibration in aigckit.trust.zeroshot).

Human text: 200-token passages from English documents that ship in Debian packages (``apt-get install doc-debian
debian-faq``; the licence texts are in base-files): the Debian FAQ, constitution, social contract, manifesto, bug
reporting guide, and the GPL-3 / Apache-2.0 / GFDL-1.3 licence texts. (The repository's own docs are not used: they
may be machine-written.)

    nice -n 10 .venv/bin/python bench/trust_text.py --n 64 --json bench/trust_text.json
    .venv/bin/python bench/trust_text.py --from-samples bench/trust_text.samples.json --expected-cost  # again

The perplexity cost is reported three ways: the mean of the per-sample perplexities (the paper's number; a few
runaway samples at temperature 1 sway it), the per-token (geometric-mean) one and the median, and with
``--expected-cost`` a first-order estimate per (gamma, entropy gate) without sampling noise.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

HUMAN_FILES = ["/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz", "/usr/share/doc/debian/constitution.txt.gz",
               "/usr/share/doc/debian/social-contract.txt.gz", "/usr/share/doc/debian/debian-manifesto.gz",
               "/usr/share/doc/debian/bug-reporting.txt.gz", "/usr/share/common-licenses/GPL-3",
               "/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/GFDL-1.3"]

TOPICS = ["the history of bridges", "how bees make honey", "a rainy day in a small town", "the life of a lighthouse "
          "keeper", "why the sky is blue", "learning to play the violin", "the first day at a new school", "volcanoes",
          "a trip to the mountains", "how computers store numbers", "the ocean at night", "growing tomatoes",
          "the invention of the printing press", "a friendship between a cat and a dog", "winter in the north",
          "the importance of sleep", "a market in an old city", "how trains changed travel", "the moon landing",
          "cooking soup for a family", "a storm at sea", "the rules of chess", "recycling plastic", "a village "
          "festival", "how rivers shape valleys", "the work of a nurse", "the Roman roads", "a lost key",
          "photosynthesis", "a long walk in the forest", "the history of coffee", "why people keep diaries"]
STYLES = ["Write a short essay about {}.", "Tell a story about {}.", "Explain {} to a curious child.",
          "Describe {} in detail."]


def prompts(n: int) -> list[str]:
    """Every (style, topic) pair once (128) before any repeats."""
    out = [STYLES[i % len(STYLES)].format(TOPICS[((i // len(STYLES)) * 7 + i // 128) % len(TOPICS)])
           for i in range(n)]
    return out


def human_passages(tok, n_tokens: int, limit: int) -> list[tuple[str, str]]:
    out = []
    for f in HUMAN_FILES:
        p = Path(f)
        if not p.exists():
            print(f"missing human source {f}", file=sys.stderr)
            continue
        raw = gzip.open(p, "rt", errors="replace").read() if f.endswith(".gz") else p.read_text(errors="replace")
        words = " ".join(raw.split())  # unwrap the fixed-width lines
        ids = tok.encode(words, add_special_tokens=False)
        for s in range(0, len(ids) - n_tokens, n_tokens * 2):  # every other passage: varied, not adjacent
            out.append((p.name, tok.decode(ids[s:s + n_tokens])))
    random.Random(0).shuffle(out)
    return out[:limit]


def cond_ppl(lm, prompt_ids: list[int], gen_ids: list[int]) -> float:
    """exp(mean NLL of gen_ids given prompt_ids) under the model (one forward)."""
    from aigckit.text.kvcache import KVCache

    ids = prompt_ids + gen_ids
    cache = KVCache.for_model(lm.config, 1, len(ids), torch.float32)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1), cache)[0].float()
    lp = torch.log_softmax(logits[len(prompt_ids) - 1:], -1)
    nll = -lp.gather(-1, torch.tensor(gen_ids)[:, None]).mean()
    return math.exp(float(nll))


def expected_cost(lm, rows, key: str, delta: float, gammas=(0.25, 0.5), gates=(0.0, 1.0, 2.0, 3.0, 4.0, 5.0)) -> dict:
    """Per (gamma, gate): the expected per-token perplexity increase of one marked step, averaged over the steps of
    the unmarked samples: exp(mean over steps of E_{x~p'}[-log p(x)] - H(p)) - 1, with p the model's next-token
    distribution and p' the marked one (p itself where the entropy is below the gate). A first-order estimate
    without sampling noise (it ignores how a marked choice changes later steps); also the share of marked steps."""
    from aigckit.text.kvcache import KVCache
    from aigckit.trust.watermark import green_mask, key64

    k, V = key64(key), lm.config.vocab_size
    acc = {(g, h): [0.0, 0, 0] for g in gammas for h in gates}
    for pid, ids in rows:
        seq = pid + list(ids)
        cache = KVCache.for_model(lm.config, 1, len(seq), torch.float32)
        with torch.inference_mode():
            logits = lm.model(torch.tensor([seq[:-1]]), torch.arange(len(seq) - 1), cache)[0].float()
        L = logits[len(pid) - 1:]
        logp = torch.log_softmax(L, -1)
        ent = -(logp.exp() * logp).sum(-1)
        for t in range(L.shape[0]):
            for g in gammas:
                green = torch.from_numpy(green_mask(k, [seq[len(pid) + t - 1]], V, g, False))
                q = torch.softmax(L[t] + delta * green, -1)
                cost = float((q * -logp[t]).sum() - ent[t])
                for h in gates:
                    a = acc[(g, h)]
                    a[1] += 1
                    if ent[t] >= h:
                        a[0] += cost
                        a[2] += 1
    return {f"gamma={g:g},min_entropy={h:g}": {"ppl_increase": round(math.exp(s / n) - 1, 4),
                                                 "marked_share": round(m / n, 3)}
            for (g, h), (s, n, m) in acc.items()}


def cost_sweep(lm, args, prompt_ids) -> dict:
    """The perplexity cost per entropy gate, with its sampling noise made visible: an unmarked set (seeds s), a
    second unmarked set with other seeds (the null control: what two unmarked runs differ by), and one marked set
    per gate (seeds s). Per-token perplexity (exp of the mean NLL over all generated tokens) under the unmarked
    model; the cost is its ratio to the first unmarked set, with a 95% bootstrap interval over prompts."""
    from aigckit.trust.watermark import Watermark

    def gen(wm, seed0):
        nll = []
        for b in range(0, len(prompt_ids), args.batch):
            batch = prompt_ids[b:b + args.batch]
            res = lm.generate_batch(batch, max_new_tokens=args.tokens, temperature=args.temperature,
                                    seed=seed0 + b, ignore_eos=True, watermark=wm)
            nll += [math.log(cond_ppl(lm, pid, r.token_ids)) for pid, r in zip(batch, res)]
        return np.array(nll)

    gates = [float(g) for g in args.cost_gates.split(",")]
    t0 = time.time()
    sets = {"plain": gen(None, 0), "plain, other seeds": gen(None, 10_000)}
    print(f"unmarked sets {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    for g in gates:
        wm = Watermark("bench-key-2026", gamma=args.gamma, delta=args.delta, min_entropy=g)
        sets[f"gate {g:g}"] = gen(wm, 0)
        print(f"gate {g:g} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    base = sets["plain"]
    rng = np.random.default_rng(0)
    boots = rng.integers(0, len(base), (2000, len(base)))
    out = {"n": len(base), "tokens": args.tokens, "gamma": args.gamma, "delta": args.delta,
           "ppl_token_plain": float(np.exp(base.mean())), "sets": {}}
    for name, v in sets.items():
        r = np.exp(v[boots].mean(1) - base[boots].mean(1)) - 1  # same prompts resampled on both sides
        out["sets"][name] = {"ppl_token": round(float(np.exp(v.mean())), 3),
                             "cost": round(float(np.exp(v.mean() - base.mean()) - 1), 4),
                             "ci95": [round(float(np.quantile(r, 0.025)), 4), round(float(np.quantile(r, 0.975)), 4)],
                             "median_ppl": round(float(np.exp(np.median(v))), 3)}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative) (Mann-Whitney), ties count half."""
    pos_a, neg_a = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((pos_a > neg_a).sum() + 0.5 * (pos_a == neg_a).sum()) / (pos_a.size * neg_a.size))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantize", default=None, help="int8 / int4 / w8a8 (faster on a busy CPU)")
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--delta", type=float, default=2.0)
    ap.add_argument("--context-width", type=int, default=1)
    ap.add_argument("--self-hash", action="store_true")
    ap.add_argument("--min-entropy", type=float, default=None, help="the watermark's entropy gate (default: "
                    "Watermark's)")
    ap.add_argument("--detect-gates", default=None, metavar="G,G,...",
                    help="also detect with the model's entropies, scoring only steps at or above each gate "
                         "(default: the watermark's min_entropy)")
    ap.add_argument("--skip-zeroshot", action="store_true", help="only the watermark measurements")
    ap.add_argument("--expected-cost", action="store_true",
                    help="also the first-order perplexity cost of each (gamma, gate) on the unmarked samples")
    ap.add_argument("--from-samples", default=None, metavar="FILE",
                    help="analyse the samples a run saved (--json X writes X.samples.json) instead of generating")
    ap.add_argument("--cost-gates", default=None, metavar="G,G,...",
                    help="only the perplexity cost: unmarked twice (other seeds: the noise) and marked per gate")
    ap.add_argument("--human", type=int, default=64, help="human passages")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from aigckit.text.lm import load_lm
    from aigckit.trust.detect import detect_ids, detect_text
    from aigckit.trust.watermark import Watermark
    from aigckit.trust.zeroshot import sampling_discrepancy

    t0 = time.time()
    lm = load_lm(args.model, quantize=args.quantize)
    tok = lm.tokenizer
    gate = {} if args.min_entropy is None else {"min_entropy": args.min_entropy}
    wm = Watermark("bench-key-2026", gamma=args.gamma, delta=args.delta, context_width=args.context_width,
                   self_hash=args.self_hash, **gate)
    ps = prompts(args.n)
    prompt_ids = [lm.chat_prompt([{"role": "user", "content": p}]) for p in ps]
    if args.cost_gates:
        res = cost_sweep(lm, args, prompt_ids)
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    rows = {"wm": [], "plain": []}
    if args.from_samples:  # the analysis again on samples a run saved (same watermark options)
        saved = json.loads(Path(args.from_samples).read_text())
        rows = {k: [(r["prompt"], r["ids"]) for r in v] for k, v in saved.items()}
    for kind in ("wm", "plain") if not args.from_samples else ():
        for b in range(0, len(ps), args.batch):
            batch = prompt_ids[b:b + args.batch]
            res = lm.generate_batch(batch, max_new_tokens=args.tokens, temperature=args.temperature, seed=b,
                                    ignore_eos=True, watermark=wm if kind == "wm" else None)
            for pid, r in zip(batch, res):
                rows[kind].append((pid, r.token_ids))
            print(f"{kind} {b + len(batch)}/{len(ps)}  {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if args.json and not args.from_samples:  # the samples, for reruns of the analysis
        Path(args.json).with_suffix(".samples.json").write_text(json.dumps(
            {k: [{"prompt": p, "ids": ids} for p, ids in v] for k, v in rows.items()}))

    def text_of(ids):
        return tok.decode(ids, skip_special_tokens=True)

    out: dict = {"model": lm.name, "quantize": args.quantize, "n": len(rows["wm"]), "tokens": args.tokens,
                 "temperature": args.temperature,
                 "watermark": wm.describe(), "cpu_threads": torch.get_num_threads()}
    dets = {k: [detect_text(text_of(ids), wm, tok) for _, ids in v] for k, v in rows.items()}
    out["median_scored_tokens"] = float(np.median([d.n_scored for d in dets["wm"]]))
    for fpr in (1e-3, 1e-5):
        out[f"tpr@{fpr:g}"] = float(np.mean([d.p_value <= fpr for d in dets["wm"]]))
        out[f"fpr_plain@{fpr:g}"] = float(np.mean([d.p_value <= fpr for d in dets["plain"]]))
    out["median_z_wm"] = float(np.median([d.z for d in dets["wm"]]))
    out["median_z_plain"] = float(np.median([d.z for d in dets["plain"]]))
    # entropy-gated detection (the model's entropies over the re-tokenised text, no prompt)
    from aigckit.trust.detect import token_entropies

    human = human_passages(tok, args.tokens, args.human)
    gates = ([wm.min_entropy] if args.detect_gates is None else
             [float(g) for g in args.detect_gates.split(",")])
    enc = {k: [tok.encode(text_of(ids), add_special_tokens=False) for _, ids in v] for k, v in rows.items()}
    enc["human"] = [tok.encode(t, add_special_tokens=False) for _, t in human]
    ents = {k: [token_entropies(ids, lm.model, lm.config) for ids in v] for k, v in enc.items()}
    out["gated"] = {}
    for g in gates:
        gd = {k: [detect_ids(ids, wm, entropies=e, entropy_gate=g) for ids, e in zip(enc[k], ents[k])]
              for k in enc}
        r = {"median_scored_tokens": float(np.median([d.n_scored for d in gd["wm"]])),
             "median_z_wm": float(np.median([d.z for d in gd["wm"]]))}
        for fpr in (1e-3, 1e-5):
            for k, name in (("wm", "tpr"), ("plain", "fpr_plain"), ("human", "fpr_human")):
                r[f"{name}@{fpr:g}"] = float(np.mean([d.p_value <= fpr for d in gd[k]]))
        out["gated"][f"{g:g}"] = r
        print(f"gate {g:g}: {r}", file=sys.stderr, flush=True)
    ppl = {k: [cond_ppl(lm, pid, ids) for pid, ids in v] for k, v in rows.items()}
    out["ppl_plain"] = float(np.mean(ppl["plain"]))
    out["ppl_wm"] = float(np.mean(ppl["wm"]))
    out["ppl_increase"] = out["ppl_wm"] / out["ppl_plain"] - 1
    # per-token (geometric mean over samples of equal length) and median: less swayed by a few runaway samples
    for k in ("plain", "wm"):
        out[f"ppl_token_{k}"] = float(np.exp(np.mean(np.log(ppl[k]))))
        out[f"ppl_median_{k}"] = float(np.median(ppl[k]))
    out["ppl_token_increase"] = out["ppl_token_wm"] / out["ppl_token_plain"] - 1
    if args.expected_cost:
        out["expected_cost"] = expected_cost(lm, rows["plain"], "bench-key-2026", args.delta)
    out["ppl_median_increase"] = out["ppl_median_wm"] / out["ppl_median_plain"] - 1
    # robustness: random token substitutions (in token space, then detection on the ids, repeats ignored)
    rng = random.Random(1)
    special = set(tok.eos_token_ids) if hasattr(tok, "eos_token_ids") else set()
    V = lm.config.vocab_size
    # (and, for a gated watermark, gated detection: the model's entropies over the edited ids)
    for frac in (0.1, 0.2, 0.3):
        hits = {(f, g): 0 for f in (1e-3, 1e-5) for g in ((False, True) if wm.min_entropy > 0 else (False,))}
        for pid, ids in rows["wm"]:
            ids = list(ids)
            for i in rng.sample(range(len(ids)), int(frac * len(ids))):
                t = rng.randrange(V)
                while t in special:
                    t = rng.randrange(V)
                ids[i] = t
            seq = pid[-wm.context_width:] + ids
            d = {False: detect_ids(seq, wm)}
            if wm.min_entropy > 0:
                d[True] = detect_ids(seq, wm, entropies=token_entropies(seq, lm.model, lm.config))
            for f, g in hits:
                hits[f, g] += d[g].p_value <= f
        for (f, g), h in hits.items():
            out[f"tpr@{f:g}_sub{int(frac * 100)}{'_gated' if g else ''}"] = h / len(rows["wm"])
    # human text: false positives of the watermark test, and zero-shot
    hdet = [detect_text(t, wm, tok) for _, t in human]
    out["n_human"] = len(human)
    out["human_sources"] = sorted({s for s, _ in human})
    for fpr in (1e-3, 1e-5):
        out[f"fpr_human@{fpr:g}"] = float(np.mean([d.p_value <= fpr for d in hdet]))
    if not args.skip_zeroshot:
        zs_model = [sampling_discrepancy(ids, lm.model, lm.config)[0] for _, ids in rows["plain"]]
        zs_human = [sampling_discrepancy(tok.encode(t, add_special_tokens=False), lm.model, lm.config)[0]
                    for _, t in human]
        out["zeroshot_auroc"] = auroc(zs_model, zs_human)
        out["zeroshot_scores"] = {"model": [round(z, 3) for z in zs_model], "human": [round(z, 3) for z in zs_human]}
        out["zeroshot_median_model"] = float(np.median(zs_model))
        out["zeroshot_median_human"] = float(np.median(zs_human))
        cands = sorted(zs_model + zs_human)
        best = max(((np.mean([z > c for z in zs_model]) + np.mean([z <= c for z in zs_human])) / 2, c) for c in cands)
        out["zeroshot_best_balanced_accuracy"], out["zeroshot_best_threshold"] = float(best[0]), float(best[1])
        # at the shipped threshold
        from aigckit.trust.zeroshot import THRESHOLD

        out["zeroshot_threshold"] = THRESHOLD
        out["zeroshot_tpr_at_threshold"] = float(np.mean([z > THRESHOLD for z in zs_model]))
        out["zeroshot_fpr_at_threshold"] = float(np.mean([z > THRESHOLD for z in zs_human]))
    out["seconds"] = round(time.time() - t0, 1)
    out["example_wm"] = text_of(rows["wm"][0][1])[:400]
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
