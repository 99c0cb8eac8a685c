"""Compute dtypes by name: the one table behind every ``--dtype`` option and ``dtype=`` argument.

Names only at import (no torch), so the CLI can list them without loading torch."""

from __future__ import annotations

from aigckit.errors import AigcError

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name raises ``AigcError`` (param ``dtype``)."""
    if name not in DTYPES:
        raise AigcError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}", param="dtype")
    import torch

    return getattr(torch, name)
