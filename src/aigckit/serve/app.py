"""The OpenAI-compatible HTTP server: ``create_app(registry, ...)`` -> a FastAPI app.

The routes live in ``aigckit.serve.routes`` (text: completions + chat; media: embeddings + images; admin: models,
health, metrics), errors in ``aigckit.serve.errors`` (OpenAI-shaped: ``{"error": {"message", "type", "param",
"code"}}``), the API-key / body-size / metrics middleware in ``aigckit.serve.middleware``. This file only assembles
them. Shared state, read by the routes from ``request.app.state``:

* ``registry``: ``aigckit.serve.models.Registry``, the served models (``Served`` entries; text ones carry a
  ``TextWorker``)
* ``metrics``: ``aigckit.serve.metrics.Metrics``, this app's Prometheus registry
* ``limiter``: ``anyio.CapacityLimiter`` for the threads that run blocking work (token queues of streams,
  embeddings, images)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from aigckit import __version__
from aigckit.serve import errors
from aigckit.serve.metrics import Metrics
from aigckit.serve.middleware import Guard
from aigckit.serve.models import Registry
from aigckit.serve.routes import admin, audio, media, text, trust

log = logging.getLogger("aigckit.serve")
STATIC = Path(__file__).parent / "static"
LOCAL_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?$"
ROUTERS = (admin.router, text.router, media.router, audio.router, trust.router)


def create_app(registry: Registry, *, api_key: str | None = None, cors_origins: list[str] | None = None,
               max_body: int = 1 << 20, load_in_background: bool = True, on_load_error=None,
               watermark=None) -> FastAPI:
    """The server for ``registry``. Models load in a background thread at startup (``/health`` is 503 meanwhile)
    unless they are loaded already."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if registry.state == "loading":
            loop = asyncio.get_running_loop()

            def _load():
                try:
                    registry.load()
                except Exception as e:
                    log.error("loading models failed: %s", registry.error)
                    if on_load_error is not None:
                        on_load_error(e)
                    return
                # workers start on the event-loop thread, not on this loading thread (see Registry.start_workers)
                loop.call_soon_threadsafe(registry.start_workers)

            if load_in_background:
                threading.Thread(target=_load, name="aigc-load", daemon=True).start()
            else:
                await anyio.to_thread.run_sync(_load)
        yield
        registry.close()

    app = FastAPI(title="aigckit", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for aigckit's local text, embedding, image and speech models.")
    metrics = Metrics()
    app.state.registry = registry
    app.state.metrics = metrics
    from aigckit.trust.provenance import install

    install()  # generated PNGs are watermarked and signed when keys are configured
    app.state.watermark = watermark  # a aigckit.trust.Watermark: every text response is marked with it
    # threads parked on token queues of streaming requests: more than the queue can hold, so they never starve
    app.state.limiter = anyio.CapacityLimiter(max(64, 4 * registry.max_queue + 8 * registry.max_batch))
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def index():  # the playground
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # outermost last: CORS answers preflights and decorates errors; Guard checks key and body size
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, metrics=metrics)
    origins = cors_origins or []
    app.add_middleware(CORSMiddleware, allow_origins=[o for o in origins if o != "*"] if "*" not in origins else ["*"],
                       allow_origin_regex=None if origins else LOCAL_ORIGINS, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["authorization", "content-type", "x-api-key"], max_age=600)
    return app
