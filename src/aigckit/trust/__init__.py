"""Trust in generated content: text watermarks (KGW) and their exact test, zero-shot AI-text detection, signed
provenance (C2PA) and an invisible watermark for images, memorisation checks.

    from aigckit import load_lm
    from aigckit.trust import Watermark, detect_text
    wm = Watermark("my secret")
    lm = load_lm()
    text = lm.generate("Write about rivers.", watermark=wm, max_new_tokens=200).text
    print(detect_text(text, wm, lm.tokenizer).p_value)

    from aigckit.trust import provenance
    provenance.install()   # PNGs that aigckit.image writes are watermarked and signed once keys exist

Names are imported lazily (the CLI imports ``aigckit.trust.provenance`` at every start).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Watermark": "aigckit.trust.watermark",
    "watermark_from": "aigckit.trust.watermark",
    "Detection": "aigckit.trust.detect",
    "detect_ids": "aigckit.trust.detect",
    "detect_text": "aigckit.trust.detect",
    "binom_sf": "aigckit.trust.detect",
    "log_binom_sf": "aigckit.trust.detect",
    "zero_shot": "aigckit.trust.zeroshot",
    "verify": "aigckit.trust.provenance",
    "init_keys": "aigckit.trust.provenance",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'aigckit.trust' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
