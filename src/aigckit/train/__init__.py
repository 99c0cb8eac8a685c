"""Training: shared checkpoint / EMA / metrics helpers and the loop (``loop.py``); one file per model family."""
