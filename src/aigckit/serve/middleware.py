"""``Guard``: API key, body-size limit and request metrics, as one plain ASGI middleware (streaming-safe)."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Iterable

from aigckit.serve.errors import error_body
from aigckit.serve.metrics import Metrics

PUBLIC_PATHS = ("/health",)
STATIC_PATHS = ("/", "/favicon.ico")


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
