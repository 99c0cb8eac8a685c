"""`aigc detect | verify | keys`: check content for our watermarks and provenance (parsing only; see aigckit.trust).

Also ``add_watermark_args`` / ``watermark_of``: the ``--watermark KEY`` options of `aigc text` and `aigc chat`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from aigckit.errors import AigcError


def read_key(value: str | None) -> str | None:
    """A key from the command line: the string itself, ``@FILE`` (its first line) or ``env:NAME`` (so the secret
    stays out of the process list)."""
    if value is None:
        return None
    if value.startswith("@"):
        p = Path(value[1:]).expanduser()
        if not p.is_file():
            raise AigcError(f"key file {p} does not exist", param="key")
        value = p.read_text(encoding="utf-8").splitlines()[0].strip() if p.stat().st_size else ""
    elif value.startswith("env:"):
        name = value[4:]
        value = os.environ.get(name, "")
        if not value:
            raise AigcError(f"environment variable {name or '?'} is not set", param="key")
    if not value:
        raise AigcError("the watermark key is empty", param="key")
    return value


def _scheme_args(g, prefix: str = "") -> None:
    from aigckit.trust.watermark import Watermark

    g.add_argument(f"--{prefix}gamma", type=float, default=Watermark.gamma,
                   help=f"green-list fraction (default {Watermark.gamma:g})")
    g.add_argument(f"--{prefix}context-width", type=int, default=1,
                   help="context tokens that seed each green list, h (default 1; 4 with --self-hash is more robust)")
    g.add_argument(f"--{prefix}self-hash", action="store_true",
                   help="SelfHash seeding (min-hash over the context and the token itself)")
    g.add_argument(f"--{prefix}min-entropy", type=float, default=None, metavar="NATS",
                   help="entropy gate: only steps whose next-token entropy is at least this are marked (and, when "
                        f"detecting with the model, scored); default {Watermark.min_entropy:g}, 0 = every step, "
                        "the paper's scheme")


def add_watermark_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("watermark (KGW; detect with `aigc detect --key KEY`)")
    g.add_argument("--watermark", default=None, metavar="KEY",
                   help="mark the generated text with this secret key (KEY, @FILE or env:NAME)")
    g.add_argument("--watermark-delta", type=float, default=2.0, help="green-token logit bias (default 2)")
    _scheme_args(g, "watermark-")


def watermark_of(args):
    """The ``Watermark`` the options ask for, or None."""
    key = read_key(getattr(args, "watermark", None))
    if key is None:
        return None
    from aigckit.trust.watermark import Watermark

    gate = {} if args.watermark_min_entropy is None else {"min_entropy": args.watermark_min_entropy}
    return Watermark(key, gamma=args.watermark_gamma, delta=args.watermark_delta,
                     context_width=args.watermark_context_width, self_hash=args.watermark_self_hash, **gate)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect", help="test a text for our watermark, for AI generation (zero-shot), or for copying a corpus",
        description="With --key: count the watermark's green tokens and test them exactly (one-sided binomial "
                    "p-value; verdict at --fpr). With --zero-shot: Fast-DetectGPT's sampling discrepancy under "
                    "the model, no key needed, a calibrated threshold. With --against: the longest n-gram the "
                    "text shares with a corpus. TEXT is the text itself or a file name; default stdin.")
    p.add_argument("text", nargs="?", help="text or file (default: stdin)")
    p.add_argument("--model", "-m", default=None,
                   help="the model that wrote the text (default: smollm2-135m-instruct): its tokenizer, and its "
                        "weights for --zero-shot and for scoring only the watermark's gated steps")
    g = p.add_argument_group("watermark")
    g.add_argument("--key", default=None, help="the watermark key (KEY, @FILE or env:NAME)")
    _scheme_args(g)
    g.add_argument("--fpr", type=float, default=1e-3, help="false-positive rate of the verdict (default 1e-3)")
    g.add_argument("--keep-repeats", action="store_true", help="score repeated n-grams too (default: once each)")
    g.add_argument("--no-model", action="store_true",
                   help="score every token, without the model's entropies (no weights loaded; the signal of a "
                        "gated watermark is diluted by the unmarked steps, so less power)")
    g.add_argument("--window", type=int, default=None,
                   help="also test windows of this many tokens (text that mixes marked and unmarked parts)")
    g.add_argument("--stride", type=int, default=None, help="tokens between windows (default window / 2)")
    p.add_argument("--zero-shot", action="store_true", help="zero-shot AI-text detection (no key)")
    p.add_argument("--against", default=None, metavar="CORPUS",
                   help="file or folder of .txt files: report the longest shared token n-gram (memorisation)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_detect)

    p = sub.add_parser(
        "verify", help="check an image's signed provenance (C2PA) and invisible watermark",
        description="Read the C2PA manifest of IMAGE: who made it and how (the c2pa.created action and its "
                    "parameters), whether the signature and the hash over the file's bytes hold (any edit after "
                    "signing fails), and whether the signer chains to the key folder's root. Also decodes the "
                    "invisible watermark when the key folder has its secret. Exit 0 only for a valid manifest, "
                    "1 otherwise (none, tampered, bad signature).")
    p.add_argument("image", help="PNG (or JPEG) file")
    p.add_argument("--keys", default=None, help="key folder (default: $AIGC_KEYS or $AIGC_HOME/keys)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_verify)

    p = sub.add_parser("keys", help="signing keys for provenance (C2PA) and the image watermark")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION")
    k = ks.add_parser("init", help="create a local TEST certificate chain and watermark secret",
                      description="Write a local test root CA, intermediate and ES256 signing certificate "
                                  "(c2pa-chain.pem, c2pa-signer.key, c2pa-root.pem) and an image-watermark secret "
                                  "(imagemark.key) to the key folder. From then on every PNG aigckit writes is "
                                  "watermarked and signed. Nobody else trusts this root: a real deployment needs a "
                                  "certificate from a CA on the C2PA trust list (see docs/TRUST.md).")
    k.add_argument("--dir", default=None, help="key folder (default: $AIGC_KEYS or $AIGC_HOME/keys)")
    k.add_argument("--force", action="store_true", help="replace existing keys")
    k.set_defaults(func=_keys_init)
    k = ks.add_parser("show", help="print the key folder and what it holds")
    k.add_argument("--dir", default=None)
    k.set_defaults(func=_keys_show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _read_text(value: str | None) -> str:
    if value is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise AigcError("no text given: pass it (or a file name) as an argument or on stdin")
        return sys.stdin.read()
    if "\n" not in value and len(value) < 4096:
        path = Path(value).expanduser()
        try:
            if path.is_file():
                return path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            pass
    return value


def _detect(args) -> int:
    key = read_key(args.key)
    if key is None and not args.zero_shot and args.against is None:
        raise AigcError("give --key KEY (watermark), --zero-shot, or --against CORPUS", param="key")
    text = _read_text(args.text)
    from aigckit.trust.detect import detect_text, load_tokenizer
    from aigckit.trust.watermark import Watermark

    gate = {} if args.min_entropy is None else {"min_entropy": args.min_entropy}
    wm = (Watermark(key, gamma=args.gamma, context_width=args.context_width, self_hash=args.self_hash, **gate)
          if key else None)
    if not 0 < args.fpr < 1:
        raise AigcError(f"--fpr must be in (0, 1), got {args.fpr}", param="fpr")
    out: dict = {}
    lm = None  # the weights, loaded once: for the gated watermark test and for --zero-shot
    if args.zero_shot or (wm is not None and wm.min_entropy > 0 and not args.no_model):
        from aigckit.text.lm import load_lm

        lm = load_lm(args.model)
    if wm is not None or args.against is not None:
        tok = lm.tokenizer if lm is not None else load_tokenizer(args.model)
        if wm is not None:
            out["watermark"] = detect_text(text, wm, tok, lm=None if args.no_model else lm, fpr=args.fpr,
                                           ignore_repeated=not args.keep_repeats, window=args.window,
                                           stride=args.stride).to_dict()
        if args.against is not None:
            from aigckit.trust.memorisation import ngram_overlap

            out["overlap"] = ngram_overlap(text, args.against, tok).to_dict()
    if args.zero_shot:
        from aigckit.trust.zeroshot import zero_shot

        out["zero_shot"] = zero_shot(text, lm).to_dict()
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if "watermark" in out:
        d = out["watermark"]
        verdict = "WATERMARKED" if d["watermarked"] else "no watermark found"
        gated = d["params"]["entropy_gate"]
        how = f"steps >= {gated:g} nats scored" if gated is not None else "every token scored"
        print(f"{verdict} at FPR {d['fpr']:g}: {d['green']}/{d['n_scored']} green tokens "
              f"({d['green_fraction']:.3f}, gamma {args.gamma:g}), z = {d['z']:.2f}, "
              f"p = {d['p_value']:.3g} (log10 p = {d['log10_p_value']:.2f}), {d['n_tokens']} tokens, {how}")
        if d.get("best_window"):
            w = d["best_window"]
            print(f"best window: tokens {w['start']}..{w['end']}, {w['green']}/{w['n_scored']} green, "
                  f"p = {w['p_value']:.3g}, corrected for {len(d['windows'])} windows: "
                  f"{d['best_window_p_corrected']:.3g}")
    if "zero_shot" in out:
        z = out["zero_shot"]
        print(f"zero-shot: {'likely AI-generated' if z['ai'] else 'likely human'} (sampling discrepancy "
              f"{z['score']:.3f}, threshold {z['threshold']:.3f}, {z['n_tokens']} tokens){z['note']}")
    if "overlap" in out:
        o = out["overlap"]
        print(f"longest shared n-gram with the corpus: {o['longest']} tokens ({o['source'] or '-'}): "
              f"{o['text']!r}")
    return 0


def _verify(args) -> int:
    from aigckit.trust.provenance import keys_dir, verify

    res = verify(args.image, keys_dir(args.keys))
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
        return 0 if res["valid"] else 1
    m = res["manifest"]
    if m is None:
        print(f"{args.image}: no valid C2PA manifest ({res['state']})")
    else:
        status = "VALID" if res["valid"] else "INVALID (tampered or bad signature)"
        trust = "trusted signer" if res["trusted"] else "signer not in the trust anchors"
        print(f"{args.image}: manifest {status}, {trust}")
        signer = m.get("signer") or {}
        print(f"  signed by {signer.get('common_name')} ({signer.get('issuer')}), {signer.get('alg')}")
        print(f"  {m.get('action')} by {(m.get('software_agent') or {}).get('name')} "
              f"{(m.get('software_agent') or {}).get('version')}, source {m.get('digital_source_type')}")
        for k, v in (m.get("parameters") or {}).items():
            print(f"    {k}: {v}")
    for f in res["failures"]:
        print(f"  failure: {f['code']}: {f['explanation']}")
    wmk = res.get("watermark")
    if wmk is not None:
        print(f"  invisible watermark: {'found, id ' + wmk['id'] if wmk.get('found') else 'not found'}")
    return 0 if res["valid"] else 1


def _keys_init(args) -> int:
    from aigckit.trust.provenance import init_keys

    kp = init_keys(args.dir, force=args.force)
    print(f"wrote a local TEST chain and watermark secret to {kp.root} (trusted by nobody else; see docs/TRUST.md)")
    return 0


def _keys_show(args) -> int:
    from aigckit.trust.provenance import keys_dir

    kp = keys_dir(args.dir)
    for p in (kp.chain, kp.signer_key, kp.anchor, kp.imagemark):
        print(f"{p}: {'present' if p.is_file() else 'missing'}")
    return 0
