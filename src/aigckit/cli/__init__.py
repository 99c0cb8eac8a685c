"""The `aigc` command. Each sub-command lives in a small module of this package that only parses
arguments and calls the library; errors the user can fix become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from aigckit.cli import (audio, batch, constrain, data, doctor, embed, image, multimodal, serve, store, text, trust,
                        tune)

# each registers its sub-commands on the parser via `register(subparsers)` (parsing only: heavy imports are lazy)
_COMMAND_MODULES = (store, text, embed, image, multimodal, serve, audio, doctor, constrain, batch, data, tune, trust)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse usage errors: one line, exit 2
        sys.stderr.write(f"aigc: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aigc",
        description="aigckit: text generation, embeddings, image generation and serving - offline on a CPU.",
    )
    from aigckit import __version__

    parser.add_argument("--version", action="version", version=f"aigckit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _COMMAND_MODULES:
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from aigckit.errors import AigcError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from aigckit.trust.provenance import install

        install()  # PNGs written from here on are watermarked and signed when keys are configured
        rc = args.func(args)
    except (AigcError, ValueError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"aigc: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("aigc: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
