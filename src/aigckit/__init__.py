"""aigckit: AI-generated content that really works, offline on a CPU.

Public API (imported lazily so ``import aigckit`` stays fast)::

    from aigckit import load_lm
    lm = load_lm("smollm2-135m-instruct")
    print(lm.generate("Once upon a time", max_new_tokens=32).text)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_lm": "aigckit.text.lm",
    "LM": "aigckit.text.lm",
    "GenerationResult": "aigckit.text.protocol",
    "GenerationParams": "aigckit.text.params",
    "TextModel": "aigckit.text.protocol",
    "AigcError": "aigckit.errors",
    "load_image_model": "aigckit.image.api",
    "load_embedder": "aigckit.embed.bert",
    "Watermark": "aigckit.trust.watermark",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'aigckit' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
