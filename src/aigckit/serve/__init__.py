"""OpenAI-compatible HTTP server and web playground (``aigc serve``); see ``aigckit.serve.app.create_app``."""
