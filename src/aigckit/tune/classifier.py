"""A text classifier as a reward: an HF ``BertForSequenceClassification`` folder on our BERT encoder.

The folder is what ``transformers`` saves for a fine-tuned BERT / MiniLM classifier (sentiment, toxicity, topic,
a reward model): ``config.json`` (BERT fields, ``id2label``, ``num_labels``), ``model.safetensors`` (the encoder
under ``bert.``, the pooler ``bert.pooler.dense``, the head ``classifier``) and ``tokenizer.json``. The encoder is
``aigckit.embed.bert.BertModel`` (strict name table, no transformers at run time); the head is HF's:

    logits = classifier(tanh(pooler.dense(hidden[:, 0])))          # [CLS] token, dropout off at inference

``reward:`` ``classifier:DIR[:LABEL]`` scores each completion with the softmax probability of LABEL (a name of
``id2label`` or an index; default: the last label, "positive" / "LABEL_1" for the usual binary heads); a one-output
head (``num_labels`` 1, a regression reward model) gives its raw score. Parity with transformers on a tiny random
classifier: tests/tune/test_classifier_reward.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from aigckit.errors import AigcError, CorruptFileError, UnsupportedFormatError

HEAD = ("pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias")


class SequenceClassifier:
    """A loaded BERT sequence classifier: ``logits(texts) [N, num_labels]``, ``probs``. No per-call state."""

    def __init__(self, encoder, head: dict[str, Tensor], labels: list[str], path: str = "") -> None:
        self.encoder, self.head, self.labels, self.path = encoder, head, labels, path  # encoder: an embed Embedder

    def label_index(self, label: str | None) -> int:
        """Index of ``label`` (a name of ``id2label`` or an integer); None: the last label."""
        if label is None or label == "":
            return len(self.labels) - 1
        if label in self.labels:
            return self.labels.index(label)
        if label.lstrip("-").isdigit() and 0 <= int(label) < len(self.labels):
            return int(label)
        raise AigcError(f"classifier {self.path}: no label {label!r}; its labels: {', '.join(self.labels)} "
                        f"(or an index 0..{len(self.labels) - 1})", param="reward")

    @torch.inference_mode()
    def logits(self, texts: list[str], batch_size: int = 32) -> Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            ids, mask = self.encoder.tokenize([t or " " for t in texts[s:s + batch_size]])
            h = self.encoder.model(ids, mask)[:, 0].float()
            pooled = torch.tanh(F.linear(h, self.head["pooler.dense.weight"], self.head["pooler.dense.bias"]))
            out.append(F.linear(pooled, self.head["classifier.weight"], self.head["classifier.bias"]))
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def scores(self, texts: list[str], label: int) -> list[float]:
        """The reward of each text: P(label) (softmax), or the raw score of a one-output head."""
        z = self.logits(texts)
        if z.shape[1] == 1:
            return z[:, 0].tolist()
        return torch.softmax(z, dim=-1)[:, label].tolist()


def load_classifier(path: str | Path) -> SequenceClassifier:
    """Load an HF ``BertForSequenceClassification`` folder (strict: every tensor is used, shapes are checked)."""
    from aigckit.embed.bert import (BertConfig, Embedder, _load_tokenizer, _read_max_seq_length, _read_safetensors,
                                    _safetensors_files, build_bert)

    d = Path(path).expanduser()
    if not (d / "config.json").is_file():
        raise AigcError(f"classifier {d}: not a model folder (no config.json)", param="reward")
    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{d / 'config.json'}: not readable ({e})") from e
    archs = raw.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UnsupportedFormatError(f"classifier {d}: architectures {archs} has no *ForSequenceClassification "
                                     "head (a BERT / MiniLM sequence classifier is needed)")
    cfg = BertConfig.from_hf(raw)
    sd = _read_safetensors(_safetensors_files(d))
    head = {}
    for k in HEAD:
        t = sd.pop(f"bert.{k}", None) if k.startswith("pooler") else sd.pop(k, None)
        if t is None:
            t = sd.pop(k, None)
        if t is None:
            raise CorruptFileError(f"classifier {d}: missing tensor {k} (a sequence-classification head)")
        head[k] = t.float()
    n = head["classifier.weight"].shape[0]
    H = cfg.hidden_size
    if head["pooler.dense.weight"].shape != (H, H) or head["classifier.weight"].shape[1] != H \
            or head["classifier.bias"].shape != (n,) or head["pooler.dense.bias"].shape != (H,):
        raise CorruptFileError(f"classifier {d}: head shapes do not match hidden_size {H}")
    id2label = raw.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    max_len = _read_max_seq_length(d, cfg)
    encoder = Embedder(d.name, build_bert(cfg, sd), _load_tokenizer(d, max_len, cfg.vocab_size), pooling="cls",
                       max_seq_length=max_len, pad_id=cfg.pad_token_id)
    return SequenceClassifier(encoder, head, labels, str(d))
