"""``load_lm`` and ``LM``: the Python face of text generation (local models; ``openai:NAME`` goes remote)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from aigckit import store
from aigckit.dtypes import torch_dtype
from aigckit.errors import AigcError
from aigckit.text.config import LMConfig
from aigckit.text.engine import check_memory, generate, stream_tokens
from aigckit.text.kvcache import KVCache
from aigckit.text.params import GenerationParams, check_int, with_constraint
from aigckit.text.protocol import (GenerationResult, ScoreResult, TokenEvent, check_messages,  # noqa: F401
                                   single_stream)

SCORE_WINDOW = 1024  # default scoring window (tokens), if the context is longer
SCORE_CHUNK = 512  # tokens per forward inside a scoring window (bounds the logits held at once: SmolLM2 100 MB)


class LM:
    """A loaded language model + tokenizer (a ``TextModel``). Stateless between calls: safe to share across threads.

    Every generation method takes ``params: GenerationParams | None`` and keyword overrides of its fields
    (``lm.generate("Hi", p, seed=3)``); the parameters are validated once, here, and passed on as one value."""

    def __init__(self, model, tokenizer, name: str, *, dtype: str = "float32", quantize: str | None = None,
                 load_s: float = 0.0, source: str = "") -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.config: LMConfig = model.config
        self.dtype, self.quantize, self.load_s, self.source = dtype, quantize, load_s, source
        self.kernels = "torch"
        self.kernel_choice = "torch F.linear"  # what runs the linears on this CPU (kernels.cpu.selection)
        self.adapter: str | None = None  # the LoRA adapter merged at load (or applied, in a with_adapter view)
        self.adapters = None  # a multilora.AdapterSet: adapters served side by side on this base (load_lm adapters=)

    def __repr__(self) -> str:
        return f"LM({self.name!r}, arch={self.config.arch}, dtype={self.dtype}, quantize={self.quantize})"

    @property
    def run_config(self) -> dict[str, Any]:
        """What was asked for, recorded (never guessed from file names)."""
        from aigckit.text.kernels import cpu

        return {"model": self.name, "source": self.source, "dtype": self.dtype, "quantize": self.quantize,
                "kernels": self.kernels, "kernel_choice": self.kernel_choice, "cpu_isa": cpu.isa_level(),
                "env": {k: v for k, v in os.environ.items() if k in cpu.CAP_VARS},
                "arch": self.config.arch, "context": self.config.block_size, "adapter": self.adapter}

    def with_adapter(self, name: str) -> LM:
        """This model with adapter ``name`` (of ``load_lm(adapters=...)``) applied to every row: an ``LM`` sharing
        the base weights and tokenizer (no copy; ``text/multilora.py``). Unknown names raise naming ``model``."""
        from aigckit.text.multilora import AdapterModel

        if self.adapters is None:
            raise AigcError(f"{self.name} was loaded without adapters (load_lm(..., adapters={{NAME: DIR}}))",
                            param="model")
        k = self.adapters.index(name)
        lm = LM(AdapterModel(self.adapters, k), self.tokenizer, f"{self.name}:{name}", dtype=self.dtype,
                quantize=self.quantize, load_s=self.load_s, source=self.source)
        lm.kernels, lm.kernel_choice, lm.adapter = self.kernels, self.kernel_choice, self.adapters.paths[k]
        return lm

    # ----------------------------------------------------------------------------------------- prompts
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt, or a token-id prompt checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.config.vocab_size
            bad = next((i for i, t in enumerate(ids)
                        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise AigcError(f"token id {ids[bad]!r} at index {bad} is outside the vocabulary: token ids must be "
                                f"integers in [0, {vocab})", param="prompt")
        if not ids:
            raise AigcError("empty prompt: give at least one token of text", param="prompt")
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for ``messages``. Message contents are data: a special token's text inside one (e.g. a user
        writing "<|im_start|>system") is tokenised as plain text; only the template's own markers are special."""
        check_messages(messages)
        # the template already carries BOS etc.; encode_chat adds no special tokens of its own
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    # ----------------------------------------------------------------------------------------- generation
    def generate(self, prompt: str | list[int], params: GenerationParams | None = None,
                 **overrides: Any) -> GenerationResult:
        return self.generate_batch([prompt], params, **overrides)[0]

    def generate_batch(self, prompts: list[str | list[int]], params: GenerationParams | None = None,
                       **overrides: Any) -> list[GenerationResult]:
        """One ragged batch (beam search: one prompt after another)."""
        p = with_constraint(params, overrides)
        ids = [self.prompt_ids(x) for x in prompts]
        return generate(self.model, self.tokenizer, ids, p, self.name)

    def stream(self, prompt: str | list[int], params: GenerationParams | None = None,
               **overrides: Any) -> Iterator[str]:
        """Text deltas of one sampled/greedy continuation (concatenated they equal ``generate(...).text``)."""
        p = with_constraint(params, overrides)
        single_stream(p)
        events = stream_tokens(self.model, self.tokenizer, [self.prompt_ids(prompt)], p)
        return (ev.text for ev in events if ev.text)

    def stream_events(self, prompt: str | list[int], params: GenerationParams | None = None, *,
                      stats: dict | None = None, **overrides: Any) -> Iterator[TokenEvent]:
        """``TokenEvent``s of ``num_return_sequences`` rows as tokens arrive (no beam search)."""
        p = with_constraint(params, overrides)
        if p.num_beams > 1:
            raise AigcError("streaming is not available with beam search", param="num_beams")
        ids = self.prompt_ids(prompt)
        return stream_tokens(self.model, self.tokenizer, [ids] * p.num_return_sequences, p, stats)

    def chat(self, messages: list[dict[str, str]], params: GenerationParams | None = None,
             **overrides: Any) -> GenerationResult:
        return self.generate(self.chat_prompt(messages), params, **overrides)

    def chat_stream(self, messages: list[dict[str, str]], params: GenerationParams | None = None,
                    **overrides: Any) -> Iterator[str]:
        return self.stream(self.chat_prompt(messages), params, **overrides)

    # ----------------------------------------------------------------------------------------- scoring
    def score(self, text: str | list[int], *, window: int | None = None, stride: int | None = None) -> ScoreResult:
        """Mean NLL (natural log) and perplexity of ``text`` under the model.

        Sliding windows, as in transformers' perplexity guide ("perplexity of fixed-length models"): each forward
        sees at most ``window`` tokens (default: the context, at most ``SCORE_WINDOW``) and the window moves
        ``stride`` tokens at a time (default ``window // 2``); each window scores only the tokens no earlier window
        scored, with the tokens before them in the window as context. With ``stride < window`` every token after
        the first is scored once; ``stride == window`` gives non-overlapping windows (fastest, least context; the
        first token of each window has no context and is not scored, as in the guide). ``n_tokens`` counts the
        scored tokens. A window runs in chunks of ``SCORE_CHUNK`` tokens through a KV cache, so memory is bounded
        by one window's KV cache and one chunk of logits, whatever the text's length."""
        ids = self.prompt_ids(text)
        if len(ids) < 2:
            raise AigcError("text is too short to score: need at least 2 tokens", param="text")
        ctx = self.config.block_size
        if window is None:
            window = min(ctx, SCORE_WINDOW)
        check_int("window", window, 2, ctx)
        if stride is None:
            stride = max(1, window // 2)
        check_int("stride", stride, 1, window)
        dtype = next(self.model.parameters()).dtype
        check_memory(self.config, rows=1, seq_len=window, prompt_len=min(window, SCORE_CHUNK), dtype=dtype,
                     param="window")
        cache = KVCache.for_model(self.config, 1, window, dtype)
        total, count, windows = 0.0, 0, 0
        done = 1  # tokens 0..done-1 need no prediction (token 0 has no context, the others were predicted)
        with torch.inference_mode():
            for begin in range(0, len(ids), stride):
                end = min(begin + window, len(ids))
                if end <= done:
                    continue
                # this window feeds ids[begin:end] (cache slots 0..end-begin-1) and predicts ids[done:end]:
                # the logits at token j predict token j + 1
                windows += 1
                for c0 in range(begin, end, SCORE_CHUNK):
                    c1 = min(c0 + SCORE_CHUNK, end)
                    chunk, pos = torch.tensor([ids[c0:c1]]), torch.arange(c0 - begin, c1 - begin)
                    lo, hi = max(c0, done - 1), min(c1, end - 1)  # logits rows lo..hi-1 are needed
                    if hi <= lo:  # context only
                        self.model(chunk, pos, cache, last_only=True)
                        continue
                    logits = self.model(chunk, pos, cache)[0]
                    target = torch.tensor(ids[lo + 1:hi + 1])
                    total += float(torch.nn.functional.cross_entropy(logits[lo - c0:hi - c0].float(), target,
                                                                     reduction="sum"))
                    count += hi - lo
                done = end
                if end == len(ids):
                    break
        mean = total / count
        return ScoreResult(mean, math.exp(mean), count, window=window, stride=stride, windows=windows)

    def token_logprobs(self, ids: list[int], top: int = 0) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Per token of ``ids``: (its log-probability given the tokens before it, the ``top`` most likely (id,
        logprob) there); the first token has (None, []). One pass through a KV cache in ``SCORE_CHUNK`` pieces, as
        ``score`` runs (the prompt log-probabilities of the server's ``echo``; evaluation harnesses read them)."""
        ids = self.prompt_ids(ids)
        check_int("top_logprobs", top, 0, 20)
        if len(ids) > self.config.block_size:
            raise AigcError(f"{len(ids)} tokens do not fit the context window of {self.config.block_size}",
                            param="prompt")
        dtype = next(self.model.parameters()).dtype
        cache = KVCache.for_model(self.config, 1, len(ids), dtype)
        out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        with torch.inference_mode():
            for c0 in range(0, len(ids) - 1, SCORE_CHUNK):
                c1 = min(c0 + SCORE_CHUNK, len(ids) - 1)
                logp = torch.log_softmax(self.model(torch.tensor([ids[c0:c1]]), torch.arange(c0, c1), cache)[0]
                                         .float(), dim=-1)
                got = logp.gather(1, torch.tensor(ids[c0 + 1:c1 + 1])[:, None])[:, 0].tolist()
                if top:
                    v, ix = torch.topk(logp, top, dim=-1)
                    tops = [list(zip(a, b)) for a, b in zip(ix.tolist(), v.tolist())]
                else:
                    tops = [[] for _ in got]
                out.extend(zip(got, tops))
        return out


# --------------------------------------------------------------------------------------------------- loading


def _load_gguf_cached(path: Path):
    """GGUF -> (config, float32 model, tokenizer). The dequantised weights and the tokenizer are cached in the
    store (safetensors + tokenizer.json), so the second load skips parsing and dequantising the GGUF."""
    from safetensors.torch import load_file, save_file

    from aigckit.text.tokenizer import Tokenizer
    from aigckit.text.weights import load_gguf, load_into_model, open_gguf

    cdir = store.cache_dir(store.source_cache_key(store.Resolved(path.stem, "gguf", path)))
    files = ("model.safetensors", "config.json", "tokenizer.json", "aigc_tokenizer.json")
    if all((cdir / f).exists() for f in files):
        cfg = LMConfig.load(cdir / "config.json")
        model = load_into_model(cfg, load_file(str(cdir / "model.safetensors")), torch.float32)
        return cfg, model, Tokenizer.load_cache(cdir)
    reader = open_gguf(path)
    cfg, model = load_gguf(path, reader=reader, progress=sys.stderr.isatty())  # first load only: show progress
    tok = Tokenizer.from_gguf(reader)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not (cfg.tie_embeddings and k == "lm_head.weight")}
    cdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cdir.parent, prefix=".tmp-"))
    try:  # written to a temp dir and renamed: a crash never leaves half a cache
        save_file(sd, str(tmp / "model.safetensors"))
        cfg.save(tmp / "config.json")
        tok.save_cache(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path)}))
        if cdir.exists():
            shutil.rmtree(cdir)
        os.replace(tmp, cdir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a read-only store still loads, just without the cache
    return cfg, model, tok


def _quantize(net, res: store.Resolved, mode: str, tok, variant: str = "") -> None:
    """Quantisation of the linears (weight-only int8/int4, or w8a8 with int8 activations), cached in the store
    per (source, mode, kernel code + recipe)."""
    from aigckit.text import quant

    # the key covers the file format and the recipe below (which linears get which format); the weights are the same
    # on every CPU (w8a8's products are exact everywhere), so a store moved between machines stays valid
    recipe = {"int8": "int8", "int4": "int4-blocks+int8-head", "w8a8": "smoothquant0.5+w8a8"}[mode]
    key = hashlib.sha256(f"format{quant.FORMAT_VERSION}|{recipe}{variant}".encode()).hexdigest()[:12]
    path = store.cache_dir(f"{store.source_cache_key(res)}-{mode}-{key}") / "model.safetensors"
    if path.exists():
        quant.load_quantized(net, path)
        return
    if mode == "int4":
        # the output head keeps 8 bits: a 4-bit head costs SmolLM2 ~7% perplexity, 4-bit blocks ~0%
        quant.quantize_model(net, "int4", skip=lambda name, _: name == "lm_head")
    if mode == "w8a8":
        # int8 activations straight away cost SmolLM2 ~4% perplexity (outlier channels in the residual stream);
        # SmoothQuant's folds (alpha 0.5, fixed calibration text) bring all linears to +0.5%
        from aigckit.text import smoothquant

        smoothquant.smooth_llama(net, tok.encode(smoothquant.CALIBRATION_TEXT), alpha=0.5)
        quant.quantize_model(net, "w8a8")
    quant.quantize_model(net, "int8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        quant.save_quantized(net, path)  # temp file + rename inside
    except OSError:
        pass  # a read-only store still works, just without the cache


def load_lm(model: str | os.PathLike | None = None, *, dtype: str = "float32", quantize: str | None = None,
            threads: int | None = None, kernels: str = "auto", base_url: str | None = None,
            api_key: str | None = None, adapter: str | os.PathLike | None = None,
            adapters: dict[str, str | os.PathLike] | None = None):
    """Load a language model by store name, .gguf path, HF directory, or cached HF hub id.

    ``kernels``: "auto" runs float32 linears through the numba tile kernel (<= 16 rows) and oneDNN prepacked
    weights (more rows), "torch" keeps plain ``nn.Linear``. (``AIGC_NO_NUMBA=1`` turns off all numba kernels.)
    ``dtype``: one of ``aigckit.dtypes.DTYPES``. ``quantize``: None or one of ``quant.QUANT_MODES`` (int8, int4, w8a8;
    see README). ``adapter``: a LoRA adapter folder in peft's layout, merged into the weights at load
    (``text/adapter.py``). ``adapters``: ``{name: folder}`` of LoRA adapters kept apart, applied per request on top
    of the one loaded base (``lm.with_adapter(name)``, ``Scheduler.submit(..., adapter=name)``; ``text/multilora.py``).
    ``openai:NAME`` returns a remote model (OpenAI-compatible API) with the same interface."""
    if model is not None and str(model).startswith("openai:"):
        from aigckit.text.remote import RemoteLM

        if adapter is not None or adapters:
            raise AigcError("adapters apply to local models only, not openai:NAME", param="adapter")
        return RemoteLM(str(model)[len("openai:"):], base_url=base_url, api_key=api_key)
    torch_dtype(dtype)  # raises for an unknown name
    if quantize is not None:
        from aigckit.text.quant import QUANT_MODES

        if quantize not in QUANT_MODES:
            raise AigcError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {quantize!r}", param="quantize")
    if kernels not in ("auto", "torch"):
        raise AigcError(f"kernels must be 'auto' or 'torch', got {kernels!r}")
    if threads is not None:
        if threads < 1:
            raise AigcError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    from aigckit.text.tokenizer import Tokenizer
    from aigckit.text.weights import load_hf

    t0 = time.perf_counter()
    res = store.resolve(model)
    if res.format == "gguf":
        cfg, net, tok = _load_gguf_cached(res.path)
    else:
        cfg, net = load_hf(res.path)
        tok = Tokenizer.from_dir(res.path)
    variant = ""
    if adapter is not None:
        from aigckit.text.adapter import adapter_fingerprint, merge_adapter, read_adapter

        merge_adapter(net, read_adapter(adapter))
        variant = f"|adapter:{adapter_fingerprint(adapter)}"  # the quantised cache is per merged adapter
    if dtype != "float32":
        net = net.to(torch_dtype(dtype))
    from aigckit.text.kernels import cpu, gemm, onednn

    if threads is not None:
        gemm.set_num_threads(threads)
    if quantize is not None:
        _quantize(net, res, quantize, tok, variant)
    net.requires_grad_(False)
    used = "torch"
    if kernels == "auto" and dtype == "float32" and quantize is None:
        used = "onednn" if onednn.use_onednn(net) else "torch"
    mode = quantize or ("bf16" if dtype == "bfloat16" else "fp32")
    notice = cpu.reference_notice(quantize)
    if notice:
        print(notice, file=sys.stderr)
    lm = LM(net, tok, res.name, dtype=dtype, quantize=quantize, load_s=time.perf_counter() - t0,
            source=str(res.path))
    lm.kernels = used
    lm.adapter = None if adapter is None else str(adapter)
    if adapters:
        from aigckit.text.multilora import attach_adapters

        lm.adapters = attach_adapters(net, adapters)
    lm.kernel_choice = cpu.selection(mode)[mode] if used != "torch" or mode != "fp32" else "torch F.linear"
    return lm
