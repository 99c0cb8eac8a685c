"""Helpers every router uses: the served model a request names, and running blocking work off the event loop."""

from __future__ import annotations

import re
import secrets
import time

import anyio
import anyio.to_thread
from fastapi import Request

from aigckit.errors import QueueFull
from aigckit.serve.errors import ApiError
from aigckit.serve.models import Registry, Served
from aigckit.serve.schemas import MODEL_ID_PATTERN

_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)


def registry(request: Request) -> Registry:
    return request.app.state.registry


def get_model(request: Request, model_id: str, kind: str) -> Served:
    """The loaded model ``model_id`` of ``kind`` (ids are looked up in a dict, never resolved as paths)."""
    reg = registry(request)
    if not _MODEL_ID_RE.match(model_id):
        raise ApiError(400, "model must be a served model id (letters, digits, . _ : + @ -), not a path",
                       param="model", code="invalid_model")
    sm = reg.models.get(model_id)
    if sm is None:
        known = ", ".join(k for k, v in reg.models.items() if v.kind == kind) or "none"
        raise ApiError(404, f"model {model_id!r} is not served here; {kind} models: {known}",
                       param="model", code="model_not_found")
    if sm.kind != kind:
        raise ApiError(400, f"model {model_id!r} is a {sm.kind} model; {request.url.path} needs a {kind} model",
                       param="model", code="wrong_model_kind")
    if sm.obj is None:
        if reg.state == "failed":
            raise ApiError(503, f"model failed to load: {reg.error}", type="server_error", code="model_load_failed")
        raise ApiError(503, "models are still loading; retry shortly", type="server_error", code="loading")
    return sm


async def to_thread(request: Request, fn, *args):
    """``fn(*args)`` on a worker thread (``app.state.limiter`` bounds them); abandoned if the client goes away."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=request.app.state.limiter, abandon_on_cancel=True)


async def exclusive(request: Request, sm: Served, fn, *args):
    """Run a CPU-heavy call for ``sm``, one at a time, at most ``max_queue`` waiting (else 429)."""
    limit = registry(request).max_queue
    if sm.waiting >= limit:
        raise QueueFull(f"{sm.waiting} requests already waiting for {sm.id} (limit {limit})")
    sm.waiting += 1

    def locked():
        with sm.lock:
            return fn(*args)

    try:
        return await to_thread(request, locked)
    finally:
        sm.waiting -= 1


def now() -> int:
    return int(time.time())


def request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"
