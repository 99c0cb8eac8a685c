"""Trust in generated content: text watermarks (KGW) and their exact test, zero-shot AI-text detection, signed
provenance (C2PA) and an invisible watermark for images, memorisation checks.

    from aigckit import load_lm
    from aigckit.trust import Watermark, detect_text
    wm = Watermark("my secret")
    lm = load_lm()
    text = lm.generate("Write about rivers.", watermark=wm, max_new_tokens=200).text
    print(detect_text(text, wm, lm.tokenizer).p_value)
"""

from aigckit.trust.detect import Detection, binom_sf, detect_ids, detect_text, log_binom_sf
from aigckit.trust.watermark import Watermark, watermark_from

__all__ = ["Watermark", "watermark_from", "Detection", "detect_ids", "detect_text", "binom_sf", "log_binom_sf"]
