"""POST /v1/embeddings and POST /v1/images/generations: one computation per model at a time, bounded waiting."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request

from aigckit.errors import AigcError
from aigckit.serve.errors import ApiError
from aigckit.serve.routes.common import exclusive, get_model, now
from aigckit.serve.schemas import EmbeddingRequest, ImageRequest

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(request: Request, req: EmbeddingRequest):
    sm = get_model(request, req.model, "embedding")
    emb = sm.obj
    if req.dimensions is not None and req.dimensions != emb.dim:
        raise ApiError(400, f"dimensions must be {emb.dim} for {sm.id} (no truncation), got {req.dimensions}",
                       param="dimensions")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if any(t == "" for t in texts):
        raise ApiError(400, "input strings must not be empty", param="input")

    def run():
        return emb.embed(texts), sum(emb.count_tokens(texts))

    vecs, n_tok = await exclusive(request, sm, run)
    request.app.state.metrics.tokens.labels(sm.id, "prompt").inc(n_tok)
    data = []
    for i, v in enumerate(vecs):
        if req.encoding_format == "base64":
            e: Any = base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode()
        else:
            e = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": e})
    return {"object": "list", "data": data, "model": sm.id, "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}


@router.post("/v1/images/generations")
async def images(request: Request, req: ImageRequest):
    sm = get_model(request, req.model, "image")
    im = sm.obj
    res = im.model.cfg.resolution
    if req.response_format != "b64_json":
        raise ApiError(400, "response_format must be b64_json (this server stores no images)", param="response_format")
    if req.size is not None and req.size != f"{res}x{res}":
        raise ApiError(400, f"size must be {res}x{res} for {sm.id}, got {req.size}", param="size")
    prompt = req.prompt.strip()
    text_kw: dict[str, Any] = {}
    if im.text_conditioned:  # free text: the prompt as written (empty: unconditional), and a negative prompt
        classes = None
        text_kw = {"prompts": prompt, "negative_prompt": req.negative_prompt}
    elif req.negative_prompt is not None:
        raise ApiError(400, f"negative_prompt applies to text-conditioned models; {sm.id} is not one",
                       param="negative_prompt")
    elif im.conditional:
        classes = prompt if prompt else "all"
        if prompt and prompt != "all":
            try:
                im.labels_for(prompt, 1)
            except AigcError as e:  # an unknown class: 400 naming the known ones
                raise ApiError(400, str(e), param="prompt") from None
    else:
        classes = None
    if not im.diffusion and (req.steps is not None or req.guidance is not None or req.sampler is not None):
        raise ApiError(400, f"steps, guidance and sampler apply to diffusion models; {sm.id} is a {im.family}",
                       param="steps")
    kw: dict[str, Any] = {"classes": classes, "seed": req.seed, **text_kw}
    if im.diffusion:
        kw.update(sampler=req.sampler or "ddim", steps=req.steps or 50, guidance=req.guidance)
        if kw["sampler"] == "ddpm" and req.steps is not None:
            raise ApiError(400, "steps applies to the ddim sampler (ddpm runs every timestep)", param="steps")
        if kw["sampler"] == "ddim" and kw["steps"] > im.model.cfg.timesteps:
            raise ApiError(400, f"steps must be <= {im.model.cfg.timesteps} (the model's timesteps)", param="steps")

    out = await exclusive(request, sm, lambda: im.sample(req.n, **kw))
    request.app.state.metrics.images.labels(sm.id).inc(req.n)
    data = []
    for i, pil in enumerate(out.images):
        meta = dict(out.params, index=i, model_id=sm.id, prompt=req.prompt)
        if req.negative_prompt is not None:
            meta["negative_prompt"] = req.negative_prompt
        if out.labels is not None:
            label = int(out.labels[i])
            meta["class"] = im.class_names[label] if im.class_names else str(label)
        data.append({"b64_json": _png_b64(pil, meta), "revised_prompt": meta.get("class", req.prompt),
                     "parameters": meta})
    return {"created": now(), "data": data}


def _png_b64(pil, meta: dict) -> str:
    from aigckit.image.io import encode_png

    return base64.b64encode(encode_png(pil, meta)).decode()
