"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``, and the app's exception handlers.

What becomes what:

* ``ApiError`` (raised by the routes): its own status, type, param and code.
* ``AigcError`` (the library's "bad input"): 400, ``param`` from ``AigcError.param`` (engine names are given their
  API names: max_new_tokens -> max_tokens, num_return_sequences -> n).
* ``QueueFull``: 429 with ``Retry-After: 1``. A request that could never fit the queue is an ``AigcError`` (400).
* ``GenerationError`` (one request failed inside the engine): 500 with its message.
* request-schema violations: 400 naming the field and the real limit; a malformed body: 400 "not valid JSON".
* anything else: 500 "internal server error" (logged).

After a stream has started, ``in_band(e)`` gives the same body as one SSE ``data:`` chunk.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigckit.errors import AigcError, GenerationError, QueueFull

log = logging.getLogger("aigckit.serve")

# engine parameter names -> API names
API_NAMES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_exception(e: BaseException) -> ApiError:
    """The ``ApiError`` for any exception a route or a stream raised."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(429, f"server busy: {e}; retry later", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(e, AigcError):
        msg = str(e).strip() or type(e).__name__
        param = e.param
        if param in API_NAMES:
            for ours, theirs in API_NAMES.items():
                msg = msg.replace(ours, theirs)
            param = API_NAMES[param]
        return ApiError(400, msg, param=param)
    if isinstance(e, GenerationError):
        return ApiError(500, str(e), type="server_error", code="generation_failed")
    return ApiError(500, "internal server error", type="server_error")


def in_band(e: BaseException) -> dict:
    """The error body sent as an SSE chunk when a stream fails after it started."""
    a = from_exception(e)
    if a.status == 500 and not isinstance(e, (GenerationError, ApiError)):
        log.error("error while streaming", exc_info=e)
        a = ApiError(500, "internal server error while streaming", type="server_error")
    return a.body()


# ------------------------------------------------------------------------------------------ schema violations

_TYPE_MISMATCH = re.compile(r"(_type|_parsing|is_instance_of|union_tag_invalid|literal_error)$")
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _location(loc) -> list[str]:
    """Field names and indices of a pydantic error location, without "body" and the union alternatives' tags
    (``constrained-str``, ``list[int]``, ``TextPart`` ...)."""
    out = []
    for x in loc:
        if isinstance(x, int):
            out.append(str(x))
        elif x != "body" and _FIELD.match(x) and x not in _TYPE_NAMES:
            out.append(x)
    return out


def validation_error(e: RequestValidationError) -> ApiError:
    errs = list(e.errors())
    if not errs:
        return ApiError(400, "invalid request", code="invalid_value")
    first = errs[0]
    if first.get("type") == "json_invalid":
        where = first.get("loc", ())[-1]
        reason = (first.get("ctx") or {}).get("error", "malformed JSON")
        at = f" at character {where}" if isinstance(where, int) else ""
        return ApiError(400, f"the request body is not valid JSON: {reason}{at}", code="invalid_json")
    # a union reports one error per alternative: the one that is not a plain type mismatch names the real problem
    # (10,000 inputs: "at most 256 items", not "should be a valid string")
    best = next((x for x in errs if not _TYPE_MISMATCH.search(str(x.get("type", "")))), first)
    loc = _location(best.get("loc", ()))
    where = ".".join(loc)
    msg = best.get("msg", "invalid value")
    if best.get("type") == "missing" and not loc:
        msg = "the request body is missing: send a JSON object"
    return ApiError(400, f"{where}: {msg}" if where else msg, param=where or None,
                    code=str(best.get("type", "invalid_value")))


# ------------------------------------------------------------------------------------------ handlers


def install(app: FastAPI) -> None:
    """Register the exception handlers that turn everything into OpenAI-shaped errors."""

    @app.exception_handler(ApiError)
    @app.exception_handler(AigcError)
    @app.exception_handler(GenerationError)
    async def _known(request: Request, e: Exception):
        return from_exception(e).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return ApiError(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return from_exception(e).response()
