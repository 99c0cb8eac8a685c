"""POST /v1/audio/speech: text to speech with a served voice, streamed as the sentences are synthesised.

OpenAI's request (``model``, ``input``, ``voice``, ``response_format``, ``speed``, ``stream_format``) plus our
``seed`` / ``noise_scale`` / ``noise_w``. ``model`` names a served voice (``aigc serve --voice NAME``), ``voice`` one
of its speakers ("default" or the model id for one-speaker Piper voices). The first audio is synthesised before the
response starts, so a text with nothing to say is a 400, not an empty 200; after that, bytes go out as each decoder
window is ready (wav, pcm, opus; flac and mp3 when complete, see ``aigckit.audio.encode``). Each request has its own
generator and parameters; the voice's worker pool is shared.
"""

from __future__ import annotations

import base64
import itertools
import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from aigckit.errors import QueueFull
from aigckit.serve.errors import ApiError, in_band
from aigckit.serve.models import speakers
from aigckit.serve.routes.common import get_model, registry, to_thread
from aigckit.serve.schemas import SpeechRequest

router = APIRouter()


@router.post("/v1/audio/speech")
async def speech(request: Request, req: SpeechRequest):
    from aigckit.audio import SpeechParams
    from aigckit.audio.encode import audio_format, encode_audio

    sm = get_model(request, req.model, "speech")
    voice = sm.obj
    name = req.voice if isinstance(req.voice, str) else req.voice.id
    names = speakers(sm.id)
    if name not in names:
        raise ApiError(400, f"voice must be one of {', '.join(names)} (the speakers of {sm.id}), got {name!r}",
                       param="voice", code="unknown_voice")
    if req.instructions:
        raise ApiError(400, "instructions are not supported by VITS voices; leave them out", param="instructions")
    if req.response_format == "aac":
        raise ApiError(400, "response_format aac is not supported (no well-kept AAC encoder here); use mp3, opus, "
                       "flac, wav or pcm", param="response_format")
    fmt = audio_format(req.response_format)
    params = voice.resolve(SpeechParams(speed=req.speed, seed=req.seed, noise_scale=req.noise_scale,
                                        noise_w=req.noise_w))
    limit = registry(request).max_queue
    if sm.waiting >= limit:
        raise QueueFull(f"{sm.waiting} requests already being spoken by {sm.id} (limit {limit})")

    chunks = voice.stream(req.input, params)
    seconds = [0.0]

    def samples(first):
        for chunk in itertools.chain([first], chunks):
            seconds[0] += len(chunk.samples) / voice.sample_rate
            yield chunk.samples

    def start():
        """The first audio and its first bytes in one trip to a worker thread (what the time to first byte is)."""
        first = next(chunks, None)
        if first is None:
            return None
        rate, data = encode_audio(samples(first), voice.sample_rate, fmt.name, info=voice.info(params, req.input))
        return rate, data, next(data, b"")

    started = await to_thread(request, start)
    if started is None:
        raise ApiError(400, "input has no speakable words", param="input")
    rate, data, head = started
    headers = {"x-aigc-seed": str(params.seed), "x-aigc-sample-rate": str(rate), "cache-control": "no-store"}
    metrics = request.app.state.metrics

    async def body():
        sm.waiting += 1
        try:
            piece = head
            while piece is not None:
                if piece and req.stream_format == "sse":
                    event = {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}
                    yield f"data: {json.dumps(event)}\n\n".encode()
                elif piece:
                    yield piece
                piece = await to_thread(request, next, data, None)
            if req.stream_format == "sse":
                yield b'data: {"type": "speech.audio.done"}\n\n'
        except Exception as e:
            if req.stream_format != "sse":
                raise  # a broken audio stream: the connection ends early
            yield f"data: {json.dumps(in_band(e))}\n\n".encode()
        finally:
            sm.waiting -= 1
            metrics.audio_seconds.labels(sm.id).inc(seconds[0])
            try:
                data.close()
                chunks.close()
            except ValueError:  # still running on an abandoned thread (client gone): it ends with its utterance
                pass

    media = "text/event-stream" if req.stream_format == "sse" else fmt.content_type
    return StreamingResponse(body(), media_type=media, headers=headers)
