"""The server's routes, one ``router = fastapi.APIRouter()`` per area, included by ``aigckit.serve.app.create_app``:

* ``text``: POST /v1/completions, POST /v1/chat/completions (SSE streaming through one shared helper)
* ``media``: POST /v1/embeddings, POST /v1/images/generations
* ``admin``: GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics

Routes keep no state of their own: they read ``request.app.state`` (``registry``, ``metrics``, ``limiter``; see
``app.py``) through the helpers in ``common``, and raise ``ApiError`` / ``AigcError`` (``aigckit.serve.errors``).
A new area is a new module here with its own ``router``, added to ``ROUTERS`` in ``app.py``.
"""
