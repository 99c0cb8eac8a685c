"""Schemathesis against /openapi.json of a live server on tiny models (bounded examples): never a 5xx.

Both valid (positive) and schema-violating (negative) requests are generated for every operation; the server must
answer each with a 2xx/4xx (or 503 while loading), never a crash. Driven through Hypothesis directly, per operation.
"""

from __future__ import annotations

import schemathesis
from serveutil import API_KEY
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 6}
SERVED = {"/v1/completions": "tiny-chat", "/v1/chat/completions": "tiny-chat", "/v1/embeddings": "tiny-bert",
          "/v1/images/generations": "gan"}


def _served_model(op):
    """Valid requests name a served model, so they reach the engines instead of stopping at 404."""
    def fix(case):
        if isinstance(case.body, dict) and op.path in SERVED:
            case.body["model"] = SERVED[op.path]
        return case
    return fix


def test_no_server_errors(served):
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json", headers=AUTH)
    ops = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in ops}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings",
            "POST /v1/images/generations", "GET /v1/models"} <= labels
    seen: dict[str, set[int]] = {}
    for op in ops:
        for mode, n in EXAMPLES.items():
            strategy = op.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE:
                strategy = strategy.map(_served_model(op))

            @given(case=strategy)
            @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            def check(case):
                response = case.call(base_url=served.url, headers=AUTH, timeout=60)
                seen.setdefault(op.label, set()).add(response.status_code)
                assert response.status_code < 500, (op.label, response.status_code, response.text[:300])
                case.validate_response(response, checks=[not_a_server_error])

            try:
                check()
            except Unsatisfiable:  # nothing to break in e.g. GET /health: no invalid request exists
                assert mode == GenerationMode.NEGATIVE
    for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings"):
        assert any(200 <= s < 300 for s in seen[label]), (label, seen[label])
