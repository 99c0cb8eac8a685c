"""Concurrency and failure behaviour: 32 concurrent streaming chats, 429 on a full queue, in-band stream errors,
cancellation on disconnect, 503 while loading, and `aigc serve` as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serveutil import API_KEY, free_port
from fastapi.testclient import TestClient

from aigckit.errors import AigcError, GenerationError
from aigckit.serve.app import create_app
from aigckit.serve.models import Registry
from aigckit.text.engine import TokenEvent
from aigckit.text.lm import load_lm


def test_32_concurrent_streaming_chats(served, tiny_chat_dir):
    import openai

    lm = load_lm(tiny_chat_dir)
    prompts = [f"w{10 + i} w{50 + (i * 7) % 40}" for i in range(32)]
    want = [lm.chat([{"role": "user", "content": p}], max_new_tokens=6, temperature=0).text for p in prompts]
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    start = threading.Barrier(32)

    def one(i):
        start.wait(10)
        stream = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": prompts[i]}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        parts, usage, ids = [], None, set()
        for c in stream:
            ids.add(c.id)
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
            if c.usage:
                usage = c.usage
        return "".join(parts), usage, ids

    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, range(32)))
    elapsed = time.perf_counter() - t0
    assert elapsed < 60
    all_ids = set()
    for i, (text, usage, ids) in enumerate(results):
        assert text == want[i], f"client {i} got another stream's text"
        assert usage is not None and usage.prompt_tokens > 0
        assert len(ids) == 1
        all_ids |= ids
    assert len(all_ids) == 32  # every stream its own id


def test_full_queue_is_429(tiny_chat_dir):
    from aigckit.text.engine import GenerationParams
    from aigckit.text.scheduler import _Request

    lm = load_lm(tiny_chat_dir)
    reg = Registry.from_objects(text={"t": lm}, max_queue=1)
    sched = reg.models["t"].worker.scheduler
    parked = _Request([5], GenerationParams(), 1)
    parked.cancelled.set()  # dropped unread whenever the worker gets to it
    # one request waits and the worker is not woken: the one-place queue is full. Append only once the worker sleeps
    # in the condition's wait() (CPython keeps its waiting threads in ``_waiters``): a worker that is still starting
    # would see the request, drop it and empty the queue (seen once on a fast CPU: 200 instead of 429)
    deadline = time.monotonic() + 30
    while True:
        with sched.lock:
            if sched.lock._waiters:
                sched.waiting.append(parked)
                break
        assert time.monotonic() < deadline, "the scheduler's worker never went idle"
        time.sleep(0.01)
    with TestClient(create_app(reg)) as c:
        r = c.post("/v1/completions", json={"model": "t", "prompt": "w5", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"].count("server busy") == 1  # was "server busy: server busy: ..."
        r = c.post("/v1/chat/completions", json={"model": "t", "messages": [{"role": "user", "content": "w5"}],
                                                 "stream": True})
        assert r.status_code == 429  # before the stream starts: a plain HTTP error
        with sched.lock:
            sched.waiting.clear()
        assert c.post("/v1/completions", json={"model": "t", "prompt": "w5", "max_tokens": 2}).status_code == 200


def test_request_larger_than_the_queue_is_400_not_429(tiny_chat_dir):
    """n x prompts beyond --max-queue can never be served: a 400 that says why, not a 429 to retry forever."""
    app = create_app(Registry.from_objects(text={"t": load_lm(tiny_chat_dir)}, max_queue=2))
    with TestClient(app) as c:
        for body in ({"prompt": "w5", "n": 3}, {"prompt": ["w5", "w6"], "n": 2}, {"prompt": [[5], [6], [7]]}):
            r = c.post("/v1/completions", json={"model": "t", "max_tokens": 2, **body})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert "queue" in err["message"] and "at most 2" in err["message"], err
        assert r.json()["error"]["param"] == "prompt"
        r = c.post("/v1/chat/completions", json={"model": "t", "n": 3, "max_tokens": 2, "stream": True,
                                                 "messages": [{"role": "user", "content": "w5"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = c.post("/v1/completions", json={"model": "t", "prompt": "w5", "n": 2, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


class _FailingHandle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        yield TokenEvent(0, 5, None, "w5 ")
        raise AigcError("the engine gave up")


class _EndlessHandle(_FailingHandle):
    def __iter__(self):
        i = 0
        while not self.cancelled.is_set() and i < 10_000:
            time.sleep(0.002)
            i += 1
            yield TokenEvent(0, 5, None, "w5 ")


class _FakeWorker:
    context = 128
    queue_depth = active = 0

    def __init__(self, handle_cls) -> None:
        self.handle_cls, self.handles = handle_cls, []

    def queue_places(self, params, prompts=1):
        return prompts * params.num_return_sequences

    def stream(self, ids, params):
        h = self.handle_cls()
        self.handles.append(h)
        return h

    def close(self):
        pass


def _app_with(lm, handle_cls):
    reg = Registry.from_objects(text={"t": lm})
    reg.models["t"].worker.close()
    reg.models["t"].worker = worker = _FakeWorker(handle_cls)
    return create_app(reg), worker


def test_error_after_stream_start_is_in_band(tiny_chat_dir):
    app, worker = _app_with(load_lm(tiny_chat_dir), _FailingHandle)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "t", "messages": [{"role": "user", "content": "w5"}],
                                                 "stream": True})
        assert r.status_code == 200
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["message"] == "the engine gave up" and err["type"] == "invalid_request_error"
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "w5 "


class _PoisonedHandle(_FailingHandle):
    def __iter__(self):
        yield TokenEvent(0, 5, None, "w5 ")
        raise GenerationError("generation failed for this request: RuntimeError: probability tensor contains inf")


def test_a_failed_request_is_a_500_that_says_what_happened(tiny_chat_dir):
    app, worker = _app_with(load_lm(tiny_chat_dir), _PoisonedHandle)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "t", "prompt": "w5"})
        err = r.json()["error"]
        assert r.status_code == 500 and err["type"] == "server_error" and err["code"] == "generation_failed"
        assert "RuntimeError: probability tensor contains inf" in err["message"]
        r = c.post("/v1/chat/completions", json={"model": "t", "messages": [{"role": "user", "content": "w5"}],
                                                 "stream": True})
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        err = json.loads(events[-2])["error"]
        assert r.status_code == 200 and events[-1] == "[DONE]" and err["code"] == "generation_failed"
        assert "probability tensor" in err["message"]


def test_client_disconnect_cancels_generation(served, tiny_chat_dir):
    from serveutil import LiveServer

    app, worker = _app_with(load_lm(tiny_chat_dir), _EndlessHandle)
    srv = LiveServer(app, free_port()).start()
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=10,
                          json={"model": "t", "prompt": "w5", "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        deadline = time.monotonic() + 5
        while not worker.handles[0].cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.handles[0].cancelled.is_set()
    finally:
        srv.stop()


def test_health_is_503_while_loading(tiny_chat_dir, monkeypatch):
    gate = threading.Event()
    reg = Registry([f"t={tiny_chat_dir}"])
    real_load = reg.load

    def slow_load():
        gate.wait(10)
        real_load()

    monkeypatch.setattr(reg, "load", slow_load)
    with TestClient(create_app(reg)) as c:
        assert c.get("/health").status_code == 503
        r = c.post("/v1/completions", json={"model": "t", "prompt": "w5"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        gate.set()
        deadline = time.monotonic() + 20
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.post("/v1/completions", json={"model": "t", "prompt": "w5", "max_tokens": 2}).status_code == 200


def test_aigc_serve_process(tiny_chat_dir, tiny_bert_dir):
    port = free_port()
    env = dict(os.environ, AIGC_API_KEY="k1")
    proc = subprocess.Popen([sys.executable, "-m", "aigckit", "serve", "--model", f"chat={tiny_chat_dir}",
                             "--model", f"embed:{tiny_bert_dir}", "--port", str(port), "--log-level", "warning",
                             "--max-queue", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        h = {"Authorization": "Bearer k1"}
        ids = [m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]]
        assert ids == ["chat", "tiny-bert"]
        r = httpx.post(url + "/v1/completions", headers=h, json={"model": "chat", "prompt": "w5", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models").status_code == 401
        assert "<title>aigckit playground</title>" in httpx.get(url + "/").text
    finally:
        proc.terminate()
        proc.wait(10)
