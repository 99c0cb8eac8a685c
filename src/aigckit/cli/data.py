"""`aigc data tokenize | info`: text corpora as memory-mapped token shards (parsing only)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="tokenise text corpora into memory-mapped shards (.bin + .idx) once",
                       description="Large text datasets are tokenised once into shards that every training rank "
                                   "memory-maps, reading only the windows it trains on (docs/DISTRIBUTED.md).")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=type(p))
    t = dsub.add_parser("tokenize", help="tokenise a .jsonl/.parquet/.txt (path or fsspec URL) into a shard folder")
    t.add_argument("input", help="a path or fsspec URL (file://, zip://, memory://, s3:// with s3fs, hf:// ...)")
    t.add_argument("--out", required=True, help="the shard folder to create")
    t.add_argument("--model", "-m", default=None,
                   help="whose tokenizer: store name, .gguf or HF directory (default: smollm2-135m-instruct)")
    t.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default text)")
    t.add_argument("--no-eos", action="store_true", help="do not append EOS after each document")
    t.add_argument("--sft", action="store_true",
                   help="SFT rows ({\"messages\": [...]} or {\"text\": ...}, .jsonl/.parquet): one document per "
                        "row, tokenised as aigc finetune does (chat template), with a loss mask on the assistant "
                        "tokens; the folder is then aigc finetune --data")
    t.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 64M)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_tokenize)
    i = dsub.add_parser("info", help="what a shard folder holds (JSON); --verify checks every sha256")
    i.add_argument("path")
    i.add_argument("--verify", action="store_true")
    i.set_defaults(func=_info)


def _tokenize(a) -> int:
    from aigckit import store
    from aigckit.data.shards import SHARD_TOKENS, iter_texts, write_shards
    from aigckit.text.tokenizer import Tokenizer

    res = store.resolve(a.model)
    tok = Tokenizer.from_gguf(res.path) if res.format == "gguf" else Tokenizer.from_dir(res.path)
    common = dict(vocab_size=tok.vocab_size, shard_tokens=a.shard_tokens or SHARD_TOKENS, progress=not a.quiet,
                  source=a.input)
    if a.sft:
        from aigckit.tune.data import sft_shard_rows

        index = write_shards(sft_shard_rows(tok, a.input), lambda pair: pair, a.out, eos_id=None, masked=True,
                             meta={"kind": "sft", "tokenizer": res.name}, **common)
    else:
        encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731  (EOS separates documents)
        index = write_shards(iter_texts(a.input, a.field), encode, a.out, eos_id=None if a.no_eos else
                             tok.eos_token_id, meta={"kind": "text", "tokenizer": res.name}, **common)
    print(json.dumps({k: index[k] for k in ("tokens", "docs", "dtype", "vocab_size")} |
                     {"shards": len(index["shards"]), "out": a.out}))
    return 0


def _info(a) -> int:
    from aigckit.data.shards import TokenShards

    ts = TokenShards(a.path, verify=a.verify)
    print(json.dumps({k: ts.index.get(k) for k in ("version", "kind", "tokens", "docs", "dtype", "vocab_size",
                                                    "eos_id", "mask", "tokenizer", "source")} |
                     {"shards": len(ts.index["shards"]), "verified": a.verify}))
    return 0
