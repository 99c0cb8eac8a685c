"""How far the frozen text encoder alone carries the held-out phrasings: each held-out prompt's MiniLM pooled vector
is matched to the training captions' (nearest caption, and nearest class centroid); the share landing on the
prompt's class is what a model that reads only this vector could reach without learning new words.

    python docs/multimodal/text_bound.py [--per-class 20]
"""

import argparse
import json

import torch
import torch.nn.functional as F

from aigckit.multimodal import captions as C
from aigckit.multimodal import textcond

p = argparse.ArgumentParser()
p.add_argument("--per-class", type=int, default=20)
a = p.parse_args()
enc = textcond.load_text_encoder(textcond.DEFAULT_TEXT_ENCODER, textcond.DEFAULT_MAX_TOKENS)
caps = C.train_captions()
cls = {i: k // 3 for k, ids in enumerate(caps.choices) for i in ids}
ids = sorted(cls)
train = enc.encode([caps.texts[i] for i in ids]).pooled
train_cls = torch.tensor([cls[i] for i in ids])
for name, pairs in (("held-out", C.heldout_prompts(a.per_class, 0)), ("training", C.seen_prompts(a.per_class, 0))):
    v = enc.encode([q for q, _ in pairs]).pooled
    y = torch.tensor([c for _, c in pairs])
    nearest = train_cls[(v @ train.T).argmax(1)]
    cent = F.normalize(torch.stack([train[train_cls == c].mean(0) for c in range(10)]), dim=-1)
    by_centroid = (v @ cent.T).argmax(1)
    print(json.dumps({"prompts": name, "n": len(pairs),
                      "nearest_caption_class_accuracy": round((nearest == y).float().mean().item(), 3),
                      "nearest_centroid_accuracy": round((by_centroid == y).float().mean().item(), 3),
                      "per_class_nearest": [round((nearest[y == c] == c).float().mean().item(), 2)
                                            for c in range(10)]}))
