"""The OpenAI-compatible HTTP server: ``create_app(registry, ...)`` -> a FastAPI app.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming), POST /v1/embeddings,
POST /v1/images/generations, GET /health, GET /metrics, and the playground at /.
Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigckit.errors import AigcError
from aigckit.serve.models import Registry, Served
from aigckit.serve.schemas import (MODEL_ID_PATTERN, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                   ImageRequest)
from aigckit.serve.worker import QueueFull

log = logging.getLogger("aigckit.serve")
STATIC = Path(__file__).parent / "static"
LOCAL_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?$"
PUBLIC_PATHS = ("/health",)
STATIC_PATHS = ("/", "/favicon.ico")
_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)
# engine parameter names -> API names, for error messages
_API_NAMES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}


# ------------------------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _json_error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _user_error(e: Exception) -> ApiError:
    """AigcError / ValueError -> 400, with ``param`` guessed from "<name> must ..." messages."""
    msg = str(e).strip() or type(e).__name__
    for ours, theirs in _API_NAMES.items():
        msg = msg.replace(ours, theirs)
    m = re.match(r"^([a-z_]+) (must|is|are) ", msg)
    param = m.group(1) if m else None
    if msg.startswith("prompt is") or "context window" in msg:
        param = param or "prompt"
    return ApiError(400, msg, param=param)


def _queue_full(e: QueueFull) -> ApiError:
    return ApiError(429, f"server busy: {e}; retry later", type="rate_limit_error", code="queue_full")


# ------------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("aigc_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("aigc_request_seconds", "HTTP request latency (to the last byte for streams)",
                                 ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("aigc_tokens_total", "tokens processed", ["model", "type"], registry=r)
        self.ttft = Histogram("aigc_time_to_first_token_seconds", "time to first token", ["model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.queue = Gauge("aigc_queue_depth", "requests waiting", ["model"], registry=r)
        self.active = Gauge("aigc_active_requests", "requests decoding", ["model"], registry=r)
        self.images = Counter("aigc_images_total", "images generated", ["model"], registry=r)

    def render(self, reg: Registry) -> bytes:
        from prometheus_client import generate_latest

        for sm in reg.models.values():
            if sm.worker is not None:
                self.queue.labels(sm.id).set(sm.worker.queue_depth)
                self.active.labels(sm.id).set(sm.worker.active)
            elif sm.obj is not None:
                self.queue.labels(sm.id).set(sm.waiting)
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------------------------ middleware


class Guard:
    """API key, body-size limit and request metrics, as one plain ASGI middleware (streaming-safe)."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: Metrics) -> None:
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def _reply(self, send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": data})

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        got = headers.get(b"authorization", b"").decode("latin-1")
        token = got[7:].strip() if got[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
        return bool(token) and hmac.compare_digest(token.encode(), self.api_key.encode())  # type: ignore[union-attr]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status_box = {"status": 500}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status_box["status"] = msg["status"]
            await send(msg)

        try:
            await self._handle(scope, receive, send_wrapped)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(name, str(status_box["status"])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)

    async def _handle(self, scope, receive, send) -> None:
        path = scope["path"]
        headers = dict(scope["headers"])
        public = path in PUBLIC_PATHS or path in STATIC_PATHS or path.startswith("/static/")
        if self.api_key and not public and scope["method"] != "OPTIONS" and not self._authorised(headers):
            await self._reply(send, 401, error_body("missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                     "invalid_request_error", None, "invalid_api_key"),
                              [(b"www-authenticate", b"Bearer")])
            return
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        too_large = error_body(f"request body larger than {self.max_body} bytes", "invalid_request_error", None,
                               "request_too_large")
        if declared > self.max_body:
            await self._reply(send, 413, too_large)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            # read the whole (bounded) body first, then replay it; later receives pass through (disconnects)
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    await self._reply(send, 413, too_large)
                    return
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            replayed = False

            async def receive_replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, receive_replay, send)
            return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------------------ helpers


def _now() -> int:
    return int(time.time())


def _rid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


async def _to_thread(fn, *args, limiter=None):
    return await anyio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)


def _next_event(it):
    return next(it, None)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class _Row:
    """One returned sequence as it grows."""

    __slots__ = ("text", "ids", "lps", "finish")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.finish = "length"

    def add(self, ev) -> None:
        self.text.append(ev.text)
        if ev.token_id is not None:
            self.ids.append(ev.token_id)
            if ev.logprob is not None:
                self.lps.append(ev.logprob)
        if ev.finish_reason:
            self.finish = ev.finish_reason


def _collect(handle, n: int) -> list[_Row]:
    rows = [_Row() for _ in range(n)]
    for ev in handle:
        rows[ev.row].add(ev)
    return rows


# ------------------------------------------------------------------------------------------------------ the app


def create_app(registry: Registry, *, api_key: str | None = None, cors_origins: list[str] | None = None,
               max_body: int = 1 << 20, load_in_background: bool = True, on_load_error=None) -> FastAPI:
    """The server for ``registry``. Models load in a background thread at startup (``/health`` is 503 meanwhile)
    unless they are loaded already."""
    metrics = Metrics()
    # threads parked on token queues of streaming requests: more than the queue can hold, so they never starve
    stream_limiter = anyio.CapacityLimiter(max(64, 4 * registry.max_queue + 8 * registry.max_batch))

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
                await _to_thread(_load)
        yield
        registry.close()

    app = FastAPI(title="aigckit", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for aigckit's local text, embedding and image models.")
    app.state.registry, app.state.metrics = registry, metrics

    # ----------------------------------------------------------------------------------------- error handlers
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _json_error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, e: QueueFull):
        a = _queue_full(e)
        return _json_error(a.status, a.message, a.type, a.param, a.code, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # unions report each alternative; name the field and the first reason
        param = ".".join(loc[:1] + [x for x in loc[1:] if x.isdigit()]) or None
        where = f"{'.'.join(loc)}: " if loc else ""
        return _json_error(400, f"{where}{first.get('msg', 'invalid value')}", param=param,
                           code=str(first.get("type", "invalid_value")))

    @app.exception_handler(AigcError)
    @app.exception_handler(ValueError)
    async def _value(request: Request, e: ValueError):
        a = _user_error(e)
        return _json_error(a.status, a.message, a.type, a.param, a.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _json_error(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return _json_error(500, "internal server error", "server_error")

    # ----------------------------------------------------------------------------------------- model lookup
    def get_model(model_id: str, kind: str, route: str) -> Served:
        if not _MODEL_ID_RE.match(model_id):
            raise ApiError(400, "model must be a served model id (letters, digits, . _ : + @ -), not a path",
                           param="model", code="invalid_model")
        sm = registry.models.get(model_id)
        if sm is None:
            known = ", ".join(k for k, v in registry.models.items() if v.kind == kind) or "none"
            raise ApiError(404, f"model {model_id!r} is not served here; {kind} models: {known}",
                           param="model", code="model_not_found")
        if sm.kind != kind:
            raise ApiError(400, f"model {model_id!r} is a {sm.kind} model; {route} needs a {kind} model",
                           param="model", code="wrong_model_kind")
        if sm.obj is None:
            if registry.state == "failed":
                raise ApiError(503, f"model failed to load: {registry.error}", type="server_error",
                               code="model_load_failed")
            raise ApiError(503, "models are still loading; retry shortly", type="server_error", code="loading")
        return sm

    # ----------------------------------------------------------------------------------------- plain routes
    @app.get("/health", include_in_schema=True)
    async def health():
        body = {"status": registry.state, "models": {k: v.obj is not None for k, v in registry.models.items()}}
        if registry.state == "failed":
            body["error"] = registry.error
        return JSONResponse(body, status_code=200 if registry.state == "ready" else 503)

    @app.get("/metrics", include_in_schema=True)
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [sm.card() for sm in registry.models.values()]}

    @app.get("/v1/models/{model_id}")
    async def get_model_card(model_id: str):
        sm = registry.models.get(model_id)
        if sm is None:
            raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return sm.card()

    # ----------------------------------------------------------------------------------------- text
    def gen_params(req, max_tokens: int | None, *, logprobs: bool):
        from aigckit.text.engine import GenerationParams

        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise ApiError(400, f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)",
                               param=name, code="unsupported_parameter")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        kw = dict(max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                  no_repeat_ngram_size=req.no_repeat_ngram_size, num_beams=req.num_beams,
                  length_penalty=req.length_penalty, early_stopping=req.early_stopping,
                  num_return_sequences=req.n, stop=stop, seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos)
        p = GenerationParams.from_kwargs(**{k: v for k, v in kw.items() if v is not None})
        if p.num_beams > 1 and req.stream:
            raise ApiError(400, "stream is not available with beam search (num_beams > 1)", param="stream")
        if p.num_beams > 1 and stop:
            raise ApiError(400, "stop strings are not supported with beam search", param="stop")
        return p

    def check_prompt(sm: Served, ids: list[int], params) -> None:
        lm = sm.obj
        if not ids:
            raise ApiError(400, "empty prompt: give at least one token", param="prompt")
        vocab = lm.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        ctx = sm.worker.context if params.num_beams == 1 or sm.worker.beams_in_scheduler else lm.config.block_size
        params.budget(len(ids), ctx)  # raises when the prompt leaves no room

    async def run_rows(sm: Served, prompts: list[list[int]], params) -> list[list[_Row]]:
        """Non-streaming generation: params.num_return_sequences rows per prompt. All prompts are submitted
        before any is read, so the scheduler decodes them together."""
        n = params.num_return_sequences
        if params.num_beams > 1:
            out = []
            for ids in prompts:
                res = await _to_thread(sm.worker.beam, ids, params, limiter=stream_limiter)
                rows = []
                for s in res.sequences:
                    r = _Row()
                    r.text, r.ids, r.finish = [s.text], list(s.token_ids), s.finish_reason
                    rows.append(r)
                out.append(rows)
            return out
        handles = []
        try:
            for ids in prompts:
                handles.append(sm.worker.stream(ids, params))
            return list(await asyncio.gather(*(_to_thread(_collect, h, n, limiter=stream_limiter)
                                               for h in handles)))
        finally:
            for h in handles:
                h.cancel()

    def count(sm: Served, prompt_tokens: int, completion_tokens: int, ttft: float | None = None) -> None:
        metrics.tokens.labels(sm.id, "prompt").inc(prompt_tokens)
        metrics.tokens.labels(sm.id, "completion").inc(completion_tokens)
        if ttft is not None:
            metrics.ttft.labels(sm.id).observe(ttft)

    def token_texts(sm: Served, ids: list[int]) -> list[str]:
        return [sm.obj.tokenizer.decode([t]) for t in ids]

    async def stream_events(handle, on_first=None) -> AsyncIterator:
        it = iter(handle)
        first = True
        try:
            while True:
                ev = await _to_thread(_next_event, it, limiter=stream_limiter)
                if ev is None:
                    return
                if first and on_first is not None:
                    on_first()
                first = False
                yield ev
        finally:
            handle.cancel()

    def sse_response(gen: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def guarded_stream(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Errors after the stream started go in-band as an error chunk, then [DONE]."""
        try:
            async for chunk in gen:
                yield chunk
        except (AigcError, ValueError) as e:
            a = _user_error(e)
            yield _sse(error_body(a.message, a.type, a.param, a.code))
        except QueueFull as e:
            a = _queue_full(e)
            yield _sse(error_body(a.message, a.type, a.param, a.code))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            log.exception("error while streaming")
            yield _sse(error_body("internal server error while streaming", "server_error"))
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        sm = get_model(req.model, "text", "/v1/completions")
        lm = sm.obj
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported", param="echo")
        params = gen_params(req, req.max_tokens, logprobs=req.logprobs is not None)
        p = req.prompt
        if isinstance(p, str):
            prompts_ids, texts = [lm.encode(p)], [p]
        elif p and isinstance(p[0], str):
            prompts_ids, texts = [lm.encode(x) for x in p], list(p)
        elif p and isinstance(p[0], int):
            prompts_ids, texts = [list(p)], None
        else:
            prompts_ids, texts = [list(x) for x in p], None
        for ids in prompts_ids:
            check_prompt(sm, ids, params)
        if texts is None:
            texts = [lm.tokenizer.decode(ids) for ids in prompts_ids]
        n = params.num_return_sequences
        cid, created = _rid("cmpl"), _now()
        prompt_tokens = sum(len(x) for x in prompts_ids)

        def logprobs_obj(row: _Row):
            if req.logprobs is None:
                return None
            toks = token_texts(sm, row.ids[:len(row.lps)])
            offs, o = [], len(texts[0]) if req.echo else 0
            for t in toks:
                offs.append(o)
                o += len(t)
            return {"tokens": toks, "token_logprobs": row.lps, "top_logprobs": None, "text_offset": offs}

        if not req.stream:
            choices, completion_tokens = [], 0
            for j, rows in enumerate(await run_rows(sm, prompts_ids, params)):
                for i, r in enumerate(rows):
                    text = "".join(r.text)
                    choices.append({"index": j * n + i, "text": (texts[j] + text) if req.echo else text,
                                    "logprobs": logprobs_obj(r), "finish_reason": r.finish})
                    completion_tokens += len(r.ids)
            count(sm, prompt_tokens, completion_tokens)
            return {"id": cid, "object": "text_completion", "created": created, "model": sm.id,
                    "choices": choices, "system_fingerprint": None,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        handles = []
        try:
            for ids in prompts_ids:
                handles.append(sm.worker.stream(ids, params))
        except QueueFull:
            for h in handles:
                h.cancel()
            raise
        t0 = time.perf_counter()

        async def gen():
            completion_tokens = 0
            ttft: list[float] = []
            try:
                for j, h in enumerate(handles):
                    if req.echo:
                        for i in range(n):
                            yield _sse(_chunk_c(cid, created, sm.id, j * n + i, texts[j], None, None, include_usage))
                    async for ev in stream_events(h, lambda: ttft.append(time.perf_counter() - t0)):
                        lp = None
                        if req.logprobs is not None and ev.token_id is not None and ev.logprob is not None:
                            lp = {"tokens": token_texts(sm, [ev.token_id]), "token_logprobs": [ev.logprob],
                                  "top_logprobs": None, "text_offset": [0]}
                        if ev.token_id is not None:
                            completion_tokens += 1
                        if ev.text or ev.finish_reason or lp:
                            yield _sse(_chunk_c(cid, created, sm.id, j * n + ev.row, ev.text, lp, ev.finish_reason,
                                                include_usage))
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": sm.id,
                                "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                         "completion_tokens": completion_tokens,
                                                         "total_tokens": prompt_tokens + completion_tokens}})
            finally:
                for h in handles:
                    h.cancel()
                count(sm, prompt_tokens, completion_tokens, ttft[0] if ttft else None)

        return sse_response(guarded_stream(gen()))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        sm = get_model(req.model, "text", "/v1/chat/completions")
        lm = sm.obj
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        params = gen_params(req, req.max_completion_tokens or req.max_tokens, logprobs=req.logprobs)
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None \
                else "".join(part.text for part in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        if lm.tokenizer.chat_template is None:
            raise ApiError(400, f"model {sm.id!r} has no chat template; use /v1/completions", param="model",
                           code="no_chat_template")
        ids = await _to_thread(lm.chat_prompt, messages)
        check_prompt(sm, ids, params)
        n = params.num_return_sequences
        cid, created = _rid("chatcmpl"), _now()

        def logprobs_obj(tokens: list[int], lps: list[float]):
            if not req.logprobs:
                return None
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                                for t, lp in zip(token_texts(sm, tokens), lps)]}

        if not req.stream:
            rows = (await run_rows(sm, [ids], params))[0]
            completion_tokens = sum(len(r.ids) for r in rows)
            count(sm, len(ids), completion_tokens)
            return {"id": cid, "object": "chat.completion", "created": created, "model": sm.id,
                    "system_fingerprint": None,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(r.text)},
                                 "logprobs": logprobs_obj(r.ids[:len(r.lps)], r.lps), "finish_reason": r.finish}
                                for i, r in enumerate(rows)],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                              "total_tokens": len(ids) + completion_tokens}}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        handle = sm.worker.stream(ids, params)
        t0 = time.perf_counter()

        def chunk(i: int, delta: dict, finish: str | None = None, lp=None) -> bytes:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": sm.id,
                 "system_fingerprint": None,
                 "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return _sse(c)

        async def gen():
            completion_tokens = 0
            ttft: list[float] = []
            try:
                for i in range(n):
                    yield chunk(i, {"role": "assistant", "content": ""})
                async for ev in stream_events(handle, lambda: ttft.append(time.perf_counter() - t0)):
                    if ev.token_id is not None:
                        completion_tokens += 1
                    lp = None
                    if req.logprobs and ev.token_id is not None and ev.logprob is not None:
                        lp = logprobs_obj([ev.token_id], [ev.logprob])
                    if ev.text or lp:
                        yield chunk(ev.row, {"content": ev.text}, None, lp)
                    if ev.finish_reason:
                        yield chunk(ev.row, {}, ev.finish_reason)
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": sm.id,
                                "system_fingerprint": None, "choices": [],
                                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                                          "total_tokens": len(ids) + completion_tokens}})
            finally:
                handle.cancel()
                count(sm, len(ids), completion_tokens, ttft[0] if ttft else None)

        return sse_response(guarded_stream(gen()))

    # ----------------------------------------------------------------------------------------- embeddings, images
    async def exclusive(sm: Served, fn, *args):
        """Run a CPU-heavy call for sm, one at a time, at most max_queue waiting (else 429)."""
        if sm.waiting >= registry.max_queue:
            raise QueueFull(f"{sm.waiting} requests already waiting for {sm.id}")
        sm.waiting += 1

        def locked():
            with sm.lock:
                return fn(*args)

        try:
            return await _to_thread(locked, limiter=stream_limiter)
        finally:
            sm.waiting -= 1

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        sm = get_model(req.model, "embedding", "/v1/embeddings")
        emb = sm.obj
        if req.dimensions is not None and req.dimensions != emb.dim:
            raise ApiError(400, f"dimensions must be {emb.dim} for {sm.id} (no truncation), got {req.dimensions}",
                           param="dimensions")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if any(t == "" for t in texts):
            raise ApiError(400, "input strings must not be empty", param="input")

        def run():
            return emb.embed(texts), sum(emb.count_tokens(texts))

        vecs, n_tok = await exclusive(sm, run)
        metrics.tokens.labels(sm.id, "prompt").inc(n_tok)
        data = []
        for i, v in enumerate(vecs):
            if req.encoding_format == "base64":
                e: Any = base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode()
            else:
                e = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": e})
        return {"object": "list", "data": data, "model": sm.id,
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    @app.post("/v1/images/generations")
    async def images(req: ImageRequest):
        sm = get_model(req.model, "image", "/v1/images/generations")
        im = sm.obj
        res = im.model.cfg.resolution
        if req.response_format != "b64_json":
            raise ApiError(400, "response_format must be b64_json (this server stores no images)",
                           param="response_format")
        if req.size is not None and req.size != f"{res}x{res}":
            raise ApiError(400, f"size must be {res}x{res} for {sm.id}, got {req.size}", param="size")
        prompt = req.prompt.strip()
        if im.conditional:
            classes = prompt if prompt else "all"
            if prompt and prompt != "all":
                im.labels_for(prompt, 1)  # unknown class -> 400 naming the known ones
        else:
            classes = None
        if im.family != "ddpm" and (req.steps is not None or req.guidance is not None or req.sampler is not None):
            raise ApiError(400, f"steps, guidance and sampler apply to diffusion models; {sm.id} is a {im.family}",
                           param="steps")
        kw: dict[str, Any] = {"classes": classes, "seed": req.seed}
        if im.family == "ddpm":
            kw.update(sampler=req.sampler or "ddim", steps=req.steps or 50, guidance=req.guidance)
            if kw["sampler"] == "ddpm" and req.steps is not None:
                raise ApiError(400, "steps applies to the ddim sampler (ddpm runs every timestep)", param="steps")
            if kw["sampler"] == "ddim" and kw["steps"] > im.model.cfg.timesteps:
                raise ApiError(400, f"steps must be <= {im.model.cfg.timesteps} (the model's timesteps)",
                               param="steps")

        out = await exclusive(sm, lambda: im.sample(req.n, **kw))
        metrics.images.labels(sm.id).inc(req.n)
        data = []
        for i, pil in enumerate(out.images):
            meta = dict(out.params, index=i, model_id=sm.id, prompt=req.prompt)
            if out.labels is not None:
                label = int(out.labels[i])
                meta["class"] = im.class_names[label] if im.class_names else str(label)
            data.append({"b64_json": _png_b64(pil, meta), "revised_prompt": meta.get("class", req.prompt),
                         "parameters": meta})
        return {"created": _now(), "data": data}

    # ----------------------------------------------------------------------------------------- playground
    @app.get("/", include_in_schema=False)
    async def index():
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


def _chunk_c(cid, created, model, index, text, logprobs, finish, include_usage) -> dict:
    c = {"id": cid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
         "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
    if include_usage:
        c["usage"] = None
    return c


def _png_b64(pil, meta: dict) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    info.add_text("software", "aigckit")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def _version() -> str:
    try:
        from aigckit import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"
