"""`aigc embed`: sentence embeddings (BERT, e.g. all-MiniLM-L6-v2)."""

from __future__ import annotations

import argparse
import json
import sys

from aigckit.dtypes import DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed sentences with a BERT model (default minilm-l6-v2)",
                       description="Embed texts (arguments, or one per line on stdin when none are given). "
                       "Prints a summary and the cosine similarity matrix, or JSON with --json.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: stdin lines)")
    p.add_argument("--model", default="minilm-l6-v2", help="store name, HF directory or HF-cache id")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-normalize", action="store_true", help="do not scale embeddings to unit length")
    p.add_argument("--json", action="store_true", help="print {model, dim, embeddings, usage} as JSON")
    p.set_defaults(func=_embed)


def _embed(args) -> int:
    from aigckit.embed import cosine_matrix, load_embedder
    from aigckit.errors import AigcError

    texts = list(args.texts)
    if not texts:
        if sys.stdin is None or sys.stdin.isatty():
            raise AigcError("no texts given (pass TEXT arguments or pipe lines on stdin)")
        texts = [line.rstrip("\r\n") for line in sys.stdin]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise AigcError("no texts on stdin")
    emb = load_embedder(args.model, dtype=args.dtype)
    vecs = emb.embed(texts, batch_size=args.batch_size, normalize=not args.no_normalize)
    n_tokens = sum(emb.count_tokens(texts))
    if args.json:
        print(json.dumps({"model": emb.name, "dim": emb.dim, "embeddings": vecs.tolist(),
                          "usage": {"prompt_tokens": n_tokens}}))
        return 0
    print(f"{emb.name}: {len(texts)} text(s), {emb.dim} dims, {n_tokens} tokens")
    for i, (t, v) in enumerate(zip(texts, vecs)):
        head = ", ".join(f"{x:+.4f}" for x in v[:4].tolist())
        print(f"[{i}] {_short(t)}  [{head}, ...]")
    if len(texts) >= 2:
        sim = cosine_matrix(vecs)
        print("cosine similarity:")
        print("      " + "".join(f"{j:>8}" for j in range(len(texts))))
        for i in range(len(texts)):
            print(f"{i:>6}" + "".join(f"{x:8.4f}" for x in sim[i].tolist()))
    return 0


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."
