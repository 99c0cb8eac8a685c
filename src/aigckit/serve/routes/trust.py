"""POST /v1/detect (aigckit extension), and the watermark of text responses.

The server may hold a watermark of its own (``aigc serve --watermark-key``, ``create_app(watermark=...)``, kept on
``app.state.watermark``): it then marks every text response with it and refuses requests that ask for none or for
another key. Without one, a request marks its response with ``"watermark": "KEY"`` (or ``{key, gamma, delta,
context_width, self_hash}``)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from aigckit.serve.errors import ApiError
from aigckit.serve.routes.common import get_model, to_thread
from aigckit.serve.schemas import DetectRequest
from aigckit.text.params import GenerationParams
from aigckit.trust.detect import detect_text
from aigckit.trust.watermark import Watermark

router = APIRouter()


def server_watermark(request: Request) -> Watermark | None:
    return getattr(request.app.state, "watermark", None)


def with_watermark(request: Request, req, params: GenerationParams) -> GenerationParams:
    """``params`` with the watermark the request asks for (or the server's) among its processors."""
    own, asked = server_watermark(request), getattr(req, "watermark", None)
    if own is not None:
        if asked is False:
            raise ApiError(400, "this server watermarks every response; watermark cannot be false", param="watermark")
        if asked not in (None, True):
            raise ApiError(400, "this server watermarks every response with its own key; leave watermark out or "
                                "set it to true", param="watermark")
        wm = own
    elif asked is None or asked is False:
        return params
    elif asked is True:
        raise ApiError(400, "this server has no watermark key of its own: give watermark as a key string",
                       param="watermark")
    elif isinstance(asked, str):
        wm = Watermark(asked)
    else:
        wm = Watermark(**asked.model_dump())
    return GenerationParams.make(params, processors=params.processors + (wm,))


@router.post("/v1/detect")
async def detect(request: Request, req: DetectRequest):
    sm = get_model(request, req.model, "text")
    own = server_watermark(request)
    out: dict = {"object": "detection", "model": sm.id}
    if req.key is None and own is None and not req.zero_shot:
        raise ApiError(400, "give key (this server has no watermark key of its own) or zero_shot: true", param="key")
    if req.key is not None or own is not None:
        base = own or Watermark("-")
        fields = dict(gamma=base.gamma, context_width=base.context_width, self_hash=base.self_hash,
                      min_entropy=base.min_entropy)
        fields.update({k: v for k in ("gamma", "context_width", "self_hash", "min_entropy")
                       if (v := getattr(req, k)) is not None})
        wm = Watermark(req.key if req.key is not None else own.key, **fields)
        lm = sm.obj if req.entropy_gated and wm.min_entropy > 0 else None
        det = await to_thread(request, lambda: detect_text(req.text, wm, sm.obj.tokenizer, lm=lm, fpr=req.fpr,
                                                           ignore_repeated=req.ignore_repeated, window=req.window))
        out["watermark"] = det.to_dict()
    if req.zero_shot:
        from aigckit.trust.zeroshot import zero_shot

        res = await to_thread(request, lambda: zero_shot(req.text, sm.obj))
        out["zero_shot"] = res.to_dict()
    return out
