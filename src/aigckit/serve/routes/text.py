"""POST /v1/completions and POST /v1/chat/completions on the served text models.

A request becomes one validated ``GenerationParams`` (``generation_params``), its prompt(s) token ids checked against
the model (``check_prompt``), and then either rows collected from the worker (``run_rows``) or one SSE response
(``sse_response``, shared by both routes: chunk framing, usage chunk, in-band errors, cancellation, metrics).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from aigckit.serve.errors import ApiError, in_band
from aigckit.serve.models import Served
from aigckit.serve.routes.common import get_model, now, request_id, to_thread
from aigckit.serve.routes.trust import with_watermark
from aigckit.serve.schemas import ChatCompletionRequest, CompletionRequest
from aigckit.serve.structured import ToolDeltas, add_constraints, assistant_message, chat_prompt_ids, message_dict
from aigckit.text.params import GenerationParams
from aigckit.text.protocol import TokenEvent

router = APIRouter()


# ------------------------------------------------------------------------------------------ parameters, prompts


def generation_params(req, max_tokens: int | None, *, logprobs: bool, top_logprobs: int = 0) -> GenerationParams:
    """The request's sampling fields as one ``GenerationParams`` (validated here, once; OpenAI's temperature
    default is 1)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)",
                           param=name, code="unsupported_parameter")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    kw = dict(max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
              top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
              no_repeat_ngram_size=req.no_repeat_ngram_size, num_beams=req.num_beams,
              length_penalty=req.length_penalty, early_stopping=req.early_stopping, num_return_sequences=req.n,
              stop=stop, seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos, top_logprobs=top_logprobs)
    p = GenerationParams(**{k: v for k, v in kw.items() if v is not None})
    if p.num_beams > 1 and req.stream:
        raise ApiError(400, "stream is not available with beam search (num_beams > 1)", param="stream")
    if p.num_beams > 1 and stop:
        raise ApiError(400, "stop strings are not supported with beam search", param="stop")
    return p


def check_prompt(sm: Served, ids: list[int], params: GenerationParams) -> None:
    if not ids:
        raise ApiError(400, "empty prompt: give at least one token", param="prompt")
    vocab = sm.obj.config.vocab_size
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {ids[bad]} at index {bad} is outside the vocabulary of {sm.id}: token ids must "
                            f"be in [0, {vocab})", param="prompt")
    params.budget(len(ids), sm.worker.context)  # raises when the prompt leaves no room


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_texts(sm: Served, ids: list[int]) -> list[str]:
    tok = sm.obj.tokenizer  # ids past the tokenizer (a model's padded vocabulary) have no text: ""
    return [tok.decode([t]) if t < tok.vocab_size else "" for t in ids]


# ------------------------------------------------------------------------------------------ decoding


class _Row:
    """One returned sequence as it grows."""

    __slots__ = ("text", "ids", "lps", "tops", "finish", "eos")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []  # top_logprobs: per token, the k most likely (id, logprob)
        self.finish = "length"
        self.eos: tuple[int, float, list] | None = None  # the EOS that ended the row: (id, logprob, top)

    def add(self, ev: TokenEvent) -> None:
        self.text.append(ev.text)
        if ev.token_id is not None:
            self.ids.append(ev.token_id)
            if ev.logprob is not None:
                self.lps.append(ev.logprob)
            if ev.top_logprobs is not None:
                self.tops.append(ev.top_logprobs)
        elif ev.stop_token_id is not None and ev.logprob is not None:
            self.eos = (ev.stop_token_id, ev.logprob, ev.top_logprobs or [])
        if ev.finish_reason:
            self.finish = ev.finish_reason


def _collect(handle, n: int) -> list[_Row]:
    rows = [_Row() for _ in range(n)]
    for ev in handle:
        rows[ev.row].add(ev)
    return rows


def start_streams(sm: Served, prompts: list[list[int]], params: GenerationParams) -> list:
    """One worker handle per prompt; all or none (a full queue cancels those already started)."""
    sm.worker.queue_places(params, len(prompts))  # more than the queue could ever hold: 400, not 429
    handles = []
    try:
        for ids in prompts:
            handles.append(sm.worker.stream(ids, params))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def run_rows(request: Request, sm: Served, prompts: list[list[int]], params: GenerationParams
                   ) -> list[list[_Row]]:
    """Non-streaming generation: params.num_return_sequences rows per prompt. All prompts are submitted
    before any is read, so the scheduler decodes them together."""
    if params.num_beams > 1:
        sm.worker.queue_places(params, len(prompts))
        out = []
        for ids in prompts:
            res = await to_thread(request, sm.worker.beam, ids, params)
            rows = []
            for s in res.sequences:
                r = _Row()
                r.text, r.ids, r.finish = [s.text], list(s.token_ids), s.finish_reason
                rows.append(r)
            out.append(rows)
        return out
    handles = start_streams(sm, prompts, params)
    try:
        n = params.num_return_sequences
        return list(await asyncio.gather(*(to_thread(request, _collect, h, n) for h in handles)))
    finally:
        for h in handles:
            h.cancel()


def _next_event(it):
    return next(it, None)


async def _events(request: Request, handle) -> AsyncIterator[TokenEvent]:
    it = iter(handle)
    try:
        while True:
            ev = await to_thread(request, _next_event, it)
            if ev is None:
                return
            yield ev
    finally:
        handle.cancel()


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def sse_response(request: Request, sm: Served, handles: list, *, envelope: Callable[[list[dict]], dict],
                 start: Callable[[int], list[dict]], encode: Callable[[int, TokenEvent], list[dict]],
                 prompt_tokens: int, include_usage: bool) -> StreamingResponse:
    """The SSE stream of completion or chat chunks.

    For each handle ``j`` (one per prompt): the choices ``start(j)``, then ``encode(j, ev)`` for each of its
    events; each choice goes out as ``envelope([choice])``. Then the usage chunk (``envelope([])`` with ``usage``)
    when asked, and ``[DONE]``. Errors after the stream started go in-band as one error chunk; the handles are
    cancelled when the stream ends or the client goes away; token counts and time to first token go to the
    metrics."""
    metrics = request.app.state.metrics
    t0 = time.perf_counter()

    async def chunks() -> AsyncIterator[bytes]:
        completion_tokens, ttft = 0, None
        try:
            for j, handle in enumerate(handles):
                for choice in start(j):
                    yield _sse(envelope([choice]))
                async for ev in _events(request, handle):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if ev.token_id is not None:
                        completion_tokens += 1
                    for choice in encode(j, ev):
                        yield _sse(envelope([choice]))
            if include_usage:
                yield _sse(dict(envelope([]), usage=usage(prompt_tokens, completion_tokens)))
        finally:
            for h in handles:
                h.cancel()
            metrics.count(sm.id, prompt_tokens, completion_tokens, ttft)

    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for c in chunks():
                yield c
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            yield _sse(in_band(e))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _envelope(cid: str, obj: str, created: int, model: str, include_usage: bool) -> Callable[[list[dict]], dict]:
    def wrap(choices: list[dict]) -> dict:
        c = {"id": cid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
             "choices": choices}
        if include_usage:
            c["usage"] = None
        return c
    return wrap


# ------------------------------------------------------------------------------------------ routes


@router.post("/v1/completions")
async def completions(request: Request, req: CompletionRequest):
    sm = get_model(request, req.model, "text")
    lm = sm.obj
    if req.echo and req.logprobs is not None and req.stream:
        raise ApiError(400, "echo with logprobs is not supported when streaming", param="echo")
    if req.max_tokens == 0 and (req.stream or not req.echo):
        raise ApiError(400, "max_tokens 0 needs echo (and no stream): it returns the prompt and its logprobs",
                       param="max_tokens")
    params = generation_params(req, req.max_tokens or None, logprobs=req.logprobs is not None,
                               top_logprobs=req.logprobs or 0)
    params, _ = add_constraints(params, req)
    params = with_watermark(request, req, params)  # after the constraint: the bias acts on allowed tokens
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
    cid, created = request_id("cmpl"), now()
    prompt_tokens = sum(len(x) for x in prompts_ids)

    def tops_obj(tops):  # OpenAI's {token text: logprob}; tokens with the same text keep the best
        if not req.logprobs:
            return None
        out = []
        for k in tops:
            d: dict[str, float] = {}
            for t, lp in zip(token_texts(sm, [t for t, _ in k]), [lp for _, lp in k]):
                d.setdefault(t, lp)
            out.append(d)
        return out

    def logprobs_obj(row: _Row, j: int = 0):
        if req.logprobs is None:
            return None
        ids, lps, tops = row.ids[:len(row.lps)], list(row.lps), row.tops
        if req.echo:  # the prompt's own log-probabilities first (the first token has none)
            ids, lps = prompts_ids[j] + ids, [lp for lp, _ in prompt_lps[j]] + lps
            tops = [t for _, t in prompt_lps[j]] + tops
            if row.eos is not None:  # and the EOS that ended it, as vLLM lists it (harnesses drop the last entry)
                ids, lps, tops = ids + [row.eos[0]], lps + [row.eos[1]], tops + [row.eos[2]]
        toks = token_texts(sm, ids)
        offs, o = [], 0  # with echo the tokens start with the prompt's
        for t in toks:
            offs.append(o)
            o += len(t)
        top = tops_obj(tops)
        if top is not None and req.echo:
            top[0] = None
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": top, "text_offset": offs}

    if not req.stream:
        prompt_lps = []
        if req.echo and req.logprobs is not None:
            for ids in prompts_ids:
                prompt_lps.append(await to_thread(request, lm.token_logprobs, ids, req.logprobs))
        choices, completion_tokens = [], 0
        if req.max_tokens == 0:  # echo only: the prompt, scored
            all_rows = [[_Row() for _ in range(n)] for _ in prompts_ids]
        else:
            all_rows = await run_rows(request, sm, prompts_ids, params)
        for j, rows in enumerate(all_rows):
            for i, r in enumerate(rows):
                text = "".join(r.text)
                choices.append({"index": j * n + i, "text": (texts[j] + text) if req.echo else text,
                                "logprobs": logprobs_obj(r, j), "finish_reason": r.finish})
                completion_tokens += len(r.ids)
        request.app.state.metrics.count(sm.id, prompt_tokens, completion_tokens)
        return {"id": cid, "object": "text_completion", "created": created, "model": sm.id,
                "choices": choices, "system_fingerprint": None, "usage": usage(prompt_tokens, completion_tokens)}

    def choice(index: int, text: str, lp=None, finish: str | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def start(j: int) -> list[dict]:
        return [choice(j * n + i, texts[j]) for i in range(n)] if req.echo else []

    def encode(j: int, ev: TokenEvent) -> list[dict]:
        lp = None
        if req.logprobs is not None and ev.token_id is not None and ev.logprob is not None:
            lp = {"tokens": token_texts(sm, [ev.token_id]), "token_logprobs": [ev.logprob],
                  "top_logprobs": tops_obj([ev.top_logprobs or []]), "text_offset": [0]}
        return [choice(j * n + ev.row, ev.text, lp, ev.finish_reason)] if ev.text or ev.finish_reason or lp else []

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    handles = start_streams(sm, prompts_ids, params)
    return sse_response(request, sm, handles, envelope=_envelope(cid, "text_completion", created, sm.id, include_usage),
                        start=start, encode=encode, prompt_tokens=prompt_tokens, include_usage=include_usage)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, req: ChatCompletionRequest):
    sm = get_model(request, req.model, "text")
    lm = sm.obj
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params = generation_params(req, req.max_completion_tokens or req.max_tokens, logprobs=req.logprobs,
                               top_logprobs=req.top_logprobs or 0)
    params, tools = add_constraints(params, req)  # response_format / tools: constraints (serve/structured.py)
    params = with_watermark(request, req, params)
    messages = [message_dict(m) for m in req.messages]
    if lm.tokenizer.chat_template is None:
        raise ApiError(400, f"model {sm.id!r} has no chat template; use /v1/completions", param="model",
                       code="no_chat_template")
    ids = await to_thread(request, chat_prompt_ids, lm, messages, tools)
    check_prompt(sm, ids, params)
    n = params.num_return_sequences
    cid, created = request_id("chatcmpl"), now()

    def entry(t: str, lp: float) -> dict:
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    def logprobs_obj(tokens: list[int], lps: list[float], tops: list | None = None):
        if not req.logprobs:
            return None
        content = []
        for t, lp, k in zip(token_texts(sm, tokens), lps, tops or [[] for _ in tokens]):
            alts = [entry(a, b) for a, b in zip(token_texts(sm, [i for i, _ in k]), [v for _, v in k])]
            content.append(dict(entry(t, lp), top_logprobs=alts))
        return {"content": content}

    if not req.stream:
        rows = (await run_rows(request, sm, [ids], params))[0]
        completion_tokens = sum(len(r.ids) for r in rows)
        request.app.state.metrics.count(sm.id, len(ids), completion_tokens)
        return {"id": cid, "object": "chat.completion", "created": created, "model": sm.id,
                "system_fingerprint": None,
                "choices": [dict(zip(("message", "finish_reason"), assistant_message("".join(r.text), r.finish, tools)),
                                 index=i, logprobs=logprobs_obj(r.ids[:len(r.lps)], r.lps, r.tops))
                            for i, r in enumerate(rows)],
                "usage": usage(len(ids), completion_tokens)}

    def choice(index: int, delta: dict, finish: str | None = None, lp=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def start(j: int) -> list[dict]:
        return [choice(i, {"role": "assistant", "content": ""}) for i in range(n)]

    splits = [ToolDeltas() for _ in range(n)] if tools.active else None

    def encode(j: int, ev: TokenEvent) -> list[dict]:
        out = []
        lp = None
        if req.logprobs and ev.token_id is not None and ev.logprob is not None:
            lp = logprobs_obj([ev.token_id], [ev.logprob], [ev.top_logprobs or []])
        if splits is not None:  # tool calls go out as delta.tool_calls, one chunk per complete call
            out.extend(choice(ev.row, d) for d in splits[ev.row].feed(ev.text or ""))
            if ev.finish_reason:
                out.append(choice(ev.row, {}, splits[ev.row].finish(ev.finish_reason)))
            return out
        if ev.text or lp:
            out.append(choice(ev.row, {"content": ev.text}, None, lp))
        if ev.finish_reason:
            out.append(choice(ev.row, {}, ev.finish_reason))
        return out

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    handles = start_streams(sm, [ids], params)
    return sse_response(request, sm, handles,
                        envelope=_envelope(cid, "chat.completion.chunk", created, sm.id, include_usage),
                        start=start, encode=encode, prompt_tokens=len(ids), include_usage=include_usage)
