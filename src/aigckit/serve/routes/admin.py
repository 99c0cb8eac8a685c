"""GET /v1/models, GET /v1/models/{model_id}, GET /health (503 while loading), GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from aigckit.serve.errors import ApiError
from aigckit.serve.routes.common import registry

router = APIRouter()


@router.get("/health", include_in_schema=True)
async def health(request: Request):
    reg = registry(request)
    body = {"status": reg.state, "models": {k: v.obj is not None for k, v in reg.models.items()}}
    if reg.state == "failed":
        body["error"] = reg.error
    return JSONResponse(body, status_code=200 if reg.state == "ready" else 503)


@router.get("/metrics", include_in_schema=True)
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(registry(request)), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [sm.card() for sm in registry(request).models.values()]}


@router.get("/v1/models/{model_id}")
async def get_model_card(request: Request, model_id: str):
    sm = registry(request).models.get(model_id)
    if sm is None:
        raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
    return sm.card()
