"""What a server serves: ``--model`` specs -> loaded text, embedding, image and speech models (voices), each under a
plain id.

Requests name models by id only; ids are looked up in a dict, never resolved as paths.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aigckit.errors import AigcError
from aigckit.serve.schemas import MODEL_ID_PATTERN

log = logging.getLogger("aigckit.serve")

Kind = Literal["text", "embedding", "image", "speech"]
_KIND_PREFIX = {"text": "text", "lm": "text", "embed": "embedding", "embedding": "embedding", "image": "image",
                "speech": "speech", "voice": "speech"}
_STORE_KINDS: dict[str, Kind] = {"lm": "text", "embed": "embedding", "image": "image", "voice": "speech"}
_ID_RE = re.compile(MODEL_ID_PATTERN)


@dataclass
class Served:
    id: str
    kind: Kind
    spec: str = ""
    obj: Any = None  # LM | Embedder | ImageModel | Voice
    worker: Any = None  # TextWorker for text models
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)  # embeddings/images: one computation at a time
    waiting: int = 0
    base: str | None = None  # a LoRA adapter served on the text model with this id (spec: the adapter folder)
    adapter: str | None = None  # the adapter's name (the id is BASE:NAME)

    def card(self) -> dict:
        d: dict[str, Any] = {"id": self.id, "object": "model", "created": self.created, "owned_by": "aigckit",
                             "kind": self.kind}
        o = self.obj
        if o is None:
            d["ready"] = False
            return d
        if self.kind == "text":
            d.update(context_length=self.worker.context if self.worker else o.config.block_size,
                     chat=o.tokenizer.chat_template is not None)
            if self.base is not None:
                d.update(parent=self.base, adapter=self.adapter)
        elif self.kind == "embedding":
            d.update(dimensions=o.dim, max_input_tokens=o.max_seq_length)
        elif self.kind == "speech":
            d.update(sample_rate=o.sample_rate, voices=speakers(self.id))
        else:
            res = o.model.cfg.resolution
            d.update(family=o.family, size=f"{res}x{res}", classes=o.class_names or
                     [str(i) for i in range(o.num_classes)], conditional=o.conditional,
                     timesteps=getattr(o.model.cfg, "timesteps", None),
                     text_conditioned=bool(getattr(o, "text_conditioned", False)))
        return d


def _looks_like_image_run(p: Path) -> bool:
    if (p / "checkpoints").is_dir():
        return True
    cfg = p / "config.json"
    if cfg.is_file() and (p / "model.safetensors").is_file():
        try:
            return "family" in json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return False
    return False


def speakers(model_id: str) -> list[str]:
    """The names a speech request's ``voice`` may take for a served voice: "default" and its id (voices have one
    speaker; multi-speaker Piper files are refused by the loader)."""
    return ["default", model_id]


def detect(spec: str) -> tuple[str, Kind, str]:
    """``[ID=][KIND:]SPEC`` -> (id, kind, spec). KIND is text, embed, image or voice; guessed from the files if
    absent."""
    from aigckit import store

    alias = None
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._:+@-]*)=(.+)$", spec)
    if m:
        alias, spec = m.group(1), m.group(2)
    if spec.startswith("openai:"):
        raise AigcError(f"{spec}: remote models cannot be served; serve a local model")
    kind: Kind | None = None
    head, sep, rest = spec.partition(":")
    if sep and head in _KIND_PREFIX:
        kind, spec = _KIND_PREFIX[head], rest  # type: ignore[assignment]
    p = Path(spec).expanduser()
    if kind is None:
        if p.is_dir() and _looks_like_image_run(p):
            kind = "image"
        elif spec.endswith(".onnx"):
            kind = "speech"
        elif spec in store.REGISTRY:
            kind = _STORE_KINDS[store.REGISTRY[spec].kind]
        elif spec in store.BUILTIN and store.BUILTIN[spec].kind == "image":
            kind = "image"  # a text-to-image model shipped with the package (fmnist-t2i, shapes-t2i)
        else:
            r = store.resolve(spec)
            kind = "text"
            if r.format == "hf":
                try:
                    mt = json.loads((Path(r.path) / "config.json").read_text()).get("model_type")
                except (OSError, json.JSONDecodeError):
                    mt = None
                if mt == "bert":
                    kind = "embedding"
    if kind == "speech":
        from aigckit.audio.voice import resolve_voice

        resolve_voice(spec)  # a missing file, an unpulled or non-voice store name: fails here, before binding
    if alias is None:
        alias = p.name if (p.exists() or spec.startswith((".", "/", "~"))) else spec
        for ext in (".gguf", ".onnx"):
            alias = alias.removesuffix(ext)
    if not _ID_RE.match(alias):
        raise AigcError(f"model id {alias!r} is not a valid id; name it with ID=SPEC (letters, digits, . _ : + @ -)")
    return alias, kind, spec


def parse_adapter(spec: str, text_ids: list[str]) -> tuple[str, str, str]:
    """``[BASE:]NAME=DIR`` -> (base id, adapter name, folder). BASE may be left out when one text model is served;
    the adapter is served as ``BASE:NAME``."""
    from aigckit.text.adapter import CONFIG_FILE, WEIGHTS_FILE
    from aigckit.text.multilora import ADAPTER_NAME_PATTERN

    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._:+@-]*)=(.+)$", spec)
    if m is None:
        raise AigcError(f"--adapter {spec!r}: give it as NAME=DIR or BASE:NAME=DIR", param="adapter")
    key, folder = m.group(1), m.group(2)
    base, _, name = key.rpartition(":")
    if not base:
        if len(text_ids) != 1:
            raise AigcError(f"--adapter {spec!r}: {len(text_ids)} text models are served; name the base as "
                            f"BASE:NAME=DIR (text models: {', '.join(text_ids) or 'none'})", param="adapter")
        base = text_ids[0]
    elif base not in text_ids:
        raise AigcError(f"--adapter {spec!r}: {base!r} is not a served text model (text models: "
                        f"{', '.join(text_ids) or 'none'})", param="adapter")
    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise AigcError(f"--adapter {spec!r}: adapter name {name!r} must be letters, digits, . _ + @ -",
                        param="adapter")
    p = Path(folder).expanduser()
    if not (p / CONFIG_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise AigcError(f"--adapter {spec!r}: {p} is not a LoRA adapter folder (it needs {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE}, as `aigc finetune` writes in RUN/adapter)", param="adapter")
    return base, name, str(p)


class Registry:
    """The served models. ``load()`` loads them all (the server answers 503 until it is done)."""

    def __init__(self, specs: list[str] | None = None, *, dtype: str = "float32", quantize: str | None = None,
                 max_batch: int = 16, max_queue: int = 64, adapters: list[str] | None = None) -> None:
        from aigckit.dtypes import torch_dtype

        torch_dtype(dtype)  # bad options fail here, before the server binds
        if quantize is not None:
            from aigckit.text.quant import QUANT_MODES

            if quantize not in QUANT_MODES:
                raise AigcError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {quantize!r}",
                                param="quantize")
        self.models: dict[str, Served] = {}
        self.dtype, self.quantize, self.max_batch, self.max_queue = dtype, quantize, max_batch, max_queue
        self.state: Literal["loading", "ready", "failed"] = "loading"
        self.error: str | None = None
        for s in specs or []:
            mid, kind, spec = detect(s)
            self._add(Served(mid, kind, spec))
        text_ids = [k for k, v in self.models.items() if v.kind == "text"]
        for a in adapters or []:  # LoRA adapters side by side on one loaded base (text/multilora.py)
            base, name, folder = parse_adapter(a, text_ids)
            self._add(Served(f"{base}:{name}", "text", folder, base=base, adapter=name))

    def _add(self, sm: Served) -> None:
        if sm.id in self.models:
            raise AigcError(f"model id {sm.id!r} given twice; name one with ID=SPEC")
        self.models[sm.id] = sm

    @classmethod
    def from_objects(cls, *, text: dict | None = None, embedding: dict | None = None, image: dict | None = None,
                     speech: dict | None = None, max_batch: int = 16, max_queue: int = 64) -> Registry:
        """Serve already-loaded models (tests, notebooks)."""
        from aigckit.serve.worker import TextWorker

        r = cls(max_batch=max_batch, max_queue=max_queue)
        for kind, objs in (("text", text), ("embedding", embedding), ("image", image), ("speech", speech)):
            for mid, obj in (objs or {}).items():
                if not _ID_RE.match(mid):
                    raise AigcError(f"model id {mid!r} is not a valid id")
                sm = Served(mid, kind, obj=obj)  # type: ignore[arg-type]
                if kind == "text":
                    sm.worker = TextWorker(obj, max_batch=max_batch, max_queue=max_queue)
                r._add(sm)
        r.state = "ready"
        return r

    def load(self) -> None:
        """Load every model's weights (blocking; the server runs it in a background thread). Call
        ``start_workers()`` afterwards from another thread (see there) to become ready."""
        try:
            for sm in self.models.values():
                if sm.obj is not None or sm.base is not None:
                    continue
                t0 = time.perf_counter()
                if sm.kind == "text":
                    from aigckit.text.lm import load_lm

                    adapters = {a.adapter: a.spec for a in self.models.values() if a.base == sm.id}
                    sm.obj = load_lm(sm.spec, dtype=self.dtype, quantize=self.quantize, adapters=adapters or None)
                elif sm.kind == "embedding":
                    from aigckit.embed import load_embedder

                    sm.obj = load_embedder(sm.spec)
                elif sm.kind == "speech":
                    from aigckit.audio import load_voice

                    sm.obj = load_voice(sm.spec)
                else:
                    from aigckit.image.api import load_image_model

                    sm.obj = load_image_model(sm.spec)
                log.info("loaded %s (%s) in %.1fs", sm.id, sm.kind, time.perf_counter() - t0)
            for sm in self.models.values():  # adapters: views of their loaded base (no second copy of weights)
                if sm.base is not None and sm.obj is None:
                    sm.obj = self.models[sm.base].obj.with_adapter(sm.adapter)
        except Exception as e:  # reported by /health and the CLI
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            raise

    def start_workers(self) -> None:
        """Create the decoding workers, then mark the registry ready.

        Called from the server's event-loop thread, not from the thread that loaded the weights: a scheduler
        thread started from the loading thread decodes several times slower on CPU (measured 4 s -> 15-37 s for
        64 SmolLM2 tokens, getting worse per request), see bench/serve_load.py."""
        from aigckit.serve.worker import TextWorker

        for sm in self.models.values():
            if sm.kind == "text" and sm.worker is None and sm.obj is not None and sm.base is None:
                sm.worker = TextWorker(sm.obj, max_batch=self.max_batch, max_queue=self.max_queue)
        for sm in self.models.values():  # an adapter decodes in its base's scheduler, in the same batches
            if sm.base is not None and sm.worker is None and sm.obj is not None:
                sm.worker = self.models[sm.base].worker.for_adapter(sm.adapter, sm.obj)
        if self.state != "failed":
            self.state = "ready"

    def close(self) -> None:
        for sm in self.models.values():
            if sm.worker is not None:
                sm.worker.close()
            if sm.kind == "speech" and sm.obj is not None:
                sm.obj.close()  # the voice's worker threads
