"""Prometheus metrics of one app (``app.state.metrics``), in a registry of its own: several apps can live in one
process."""

from __future__ import annotations


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
        self.audio_seconds = Counter("aigc_audio_seconds_total", "seconds of speech synthesised", ["model"], registry=r)

    def render(self, reg) -> bytes:
        from prometheus_client import generate_latest

        for sm in reg.models.values():
            if sm.worker is not None:
                self.queue.labels(sm.id).set(sm.worker.queue_depth)
                self.active.labels(sm.id).set(sm.worker.active)
            elif sm.obj is not None:
                self.queue.labels(sm.id).set(sm.waiting)
        return generate_latest(self.registry)

    def count(self, model_id: str, prompt_tokens: int, completion_tokens: int, ttft: float | None = None) -> None:
        """Tokens of one finished text request (and its time to first token, if it streamed)."""
        self.tokens.labels(model_id, "prompt").inc(prompt_tokens)
        self.tokens.labels(model_id, "completion").inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(model_id).observe(ttft)
