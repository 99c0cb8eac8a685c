"""The one switch for every numba kernel: ``ENABLED`` is False when numba is missing or ``AIGC_NO_NUMBA`` is set
(read once, at import). Without numba the kernel modules still import (``njit`` becomes a no-op decorator) and
every layer takes its PyTorch reference path."""

from __future__ import annotations

import os

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the reference path working without it
    numba = None
    prange = range

    def njit(*args, **kwargs):
        if args and callable(args[0]):
            return args[0]
        return lambda fn: fn

NO_NUMBA_ENV = os.environ.get("AIGC_NO_NUMBA", "")
ENABLED = numba is not None and NO_NUMBA_ENV == ""

__all__ = ["ENABLED", "NO_NUMBA_ENV", "njit", "numba", "prange"]
