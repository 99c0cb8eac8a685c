"""llguidance wired to our tokenizer: compiled grammars cached per (grammar, tokenizer), and the per-sequence state
the engine drives (``aigckit.text.processors.ProcessorState``).

- ``llguidance.LLTokenizer`` is built once per (``Tokenizer``, model vocabulary size) from the tokenizer's HF
  ``tokenizers`` JSON (the same object our ``Tokenizer`` wraps), with every id of ``tokenizer.eos_token_ids`` as an
  end token: the grammar allows them exactly where it accepts, and only them once it can go no further.
- A grammar is compiled once per tokenizer (``LLMatcher(lltok, grammar)``, the expensive part: ms to 100s of ms
  for large schemas) into a prototype; each sequence gets ``prototype.deep_copy()`` (microseconds). The cache is
  an LRU of ``GRAMMAR_CACHE`` entries per tokenizer, and lives as long as the tokenizer.
- Each step ``process`` writes the allowed-token bitmask (1 bit per token, llguidance's layout: bit i of 32-bit word
  j is token 32 j + i) into the state's buffer and sets every other score to -inf; ``advance`` feeds the chosen token
  to the matcher; ``fork`` deep-copies it (beam search).

A token the matcher rejects (only possible when something else chose a masked token, e.g. a dead beam padded by
beam search) puts the state into an error state: it allows nothing from then on, so the engine ends that sequence
(``GenerationError``) and never returns text that breaks the grammar.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from aigckit.constrain.constraints import _llg, one_line
from aigckit.errors import AigcError

__all__ = ["ConstraintState", "start_state", "cache_info", "GRAMMAR_CACHE"]

GRAMMAR_CACHE = 64  # compiled grammars kept per tokenizer (LRU)

_LOCK = threading.Lock()
_ENTRIES: "weakref.WeakKeyDictionary[object, dict[int, _TokEntry]]" = weakref.WeakKeyDictionary()
_STATS = {"compiles": 0, "hits": 0, "compile_s": 0.0}


class _TokEntry:
    def __init__(self, lltok) -> None:
        self.lltok = lltok
        self.grammars: OrderedDict[str, object] = OrderedDict()
        self._runs: RunTables | None = None

    @property
    def runs(self) -> RunTables:
        if self._runs is None:
            self._runs = RunTables(self.lltok)
        return self._runs


class RunTables:
    """Per-token facts the repetition guard needs, from each token's bytes (special tokens count as empty):
    leading/trailing ASCII digits, the first/last byte and how often it repeats at the start/end, and whether the
    whole token is one digit run or one repeated byte."""

    def __init__(self, lltok) -> None:
        n = lltok.vocab_size
        cols = {k: np.zeros(n, dtype=np.int32) for k in
                ("dlead", "dtrail", "first", "clead", "last", "ctrail")}
        dall = np.zeros(n, dtype=bool)
        call = np.zeros(n, dtype=bool)
        for i in range(n):
            b = b"" if lltok.is_special_token(i) else lltok.decode_bytes([i])
            if not b:
                cols["first"][i] = cols["last"][i] = -1
                continue
            nd = len(b) - len(b.lstrip(b"0123456789"))
            cols["dlead"][i], cols["dtrail"][i] = nd, len(b) - len(b.rstrip(b"0123456789"))
            dall[i] = nd == len(b)
            cols["first"][i], cols["last"][i] = b[0], b[-1]
            cols["clead"][i] = len(b) - len(b.lstrip(b[:1]))
            cols["ctrail"][i] = len(b) - len(b.rstrip(b[-1:]))
            call[i] = cols["clead"][i] == len(b)
        for k, v in cols.items():
            setattr(self, k, v)
        self.dall, self.call = dall, call
        self.max_dlead = int(cols["dlead"].max(initial=0))
        self.max_clead = int(cols["clead"].max(initial=0))
        # the few tokens a guard may have to remove, so a step looks at them only, not the whole vocabulary:
        # tokens that start with a digit, tokens that start with a repeated byte, tokens by first byte
        self.digit_ids = np.flatnonzero(cols["dlead"] > 0)
        self.rep_ids = np.flatnonzero(cols["clead"] > 1)
        self.by_first = {int(c): np.flatnonzero(cols["first"] == c) for c in np.unique(cols["first"]) if c >= 0}


def _entry(tokenizer, vocab_size: int) -> _TokEntry:
    per_tok = _ENTRIES.get(tokenizer)
    if per_tok is None:
        per_tok = _ENTRIES[tokenizer] = {}
    ent = per_tok.get(vocab_size)
    if ent is None:
        backend = getattr(tokenizer, "backend", None)
        if backend is None:
            raise AigcError(f"constrained decoding needs a local model's tokenizer, got {type(tokenizer).__name__}",
                            param="constraint")
        eos = sorted(tokenizer.eos_token_ids)
        try:
            lltok = _llg().LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos or None)
        except Exception as e:  # llguidance raises plain exceptions for tokenizers it cannot map to bytes
            raise AigcError(f"this model's tokenizer cannot be used for constrained decoding: {one_line(str(e))}",
                            param="constraint") from None
        ent = per_tok[vocab_size] = _TokEntry(lltok)
    return ent


def _prototype(grammar: str, tokenizer, vocab_size: int):
    """The compiled matcher for ``grammar`` on this tokenizer (cached)."""
    with _LOCK:
        ent = _entry(tokenizer, vocab_size)
        proto = ent.grammars.get(grammar)
        if proto is not None:
            ent.grammars.move_to_end(grammar)
            _STATS["hits"] += 1
            return proto
    t0 = time.perf_counter()
    proto = _llg().LLMatcher(ent.lltok, grammar, log_level=0)  # drops the GIL while compiling
    if proto.is_error():
        raise AigcError(f"invalid constraint: {one_line(proto.get_error())}", param="constraint")
    with _LOCK:
        _STATS["compiles"] += 1
        _STATS["compile_s"] += time.perf_counter() - t0
        ent.grammars[grammar] = proto
        while len(ent.grammars) > GRAMMAR_CACHE:
            ent.grammars.popitem(last=False)
    return proto


def cache_info() -> dict:
    """Compiles, cache hits and total compile seconds since start (for benchmarks and /metrics)."""
    with _LOCK:
        return dict(_STATS, grammars=sum(len(e.grammars) for d in _ENTRIES.values() for e in d.values()))


def clear_cache() -> None:
    with _LOCK:
        _ENTRIES.clear()


def start_state(grammar: str, tokenizer, vocab_size: int, runs=None) -> ConstraintState:
    """A fresh matcher for one sequence; ``runs`` (a ``RunLimits``) adds the repetition guard."""
    proto = _prototype(grammar, tokenizer, vocab_size)
    with _LOCK:
        m = proto.deep_copy()
        guard = None
        if runs is not None and (runs.max_digits is not None or runs.max_same_char is not None):
            guard = RunGuard(runs, _entry(tokenizer, vocab_size).runs)
    return ConstraintState(m, vocab_size, guard)


class RunGuard:
    """Bounded repetition: no run of more than ``max_digits`` ASCII digits, and no byte repeated more than
    ``max_same_char`` times in a row, counted across token boundaries. A guard only narrows what the grammar allows
    when something else stays allowed, so it never leads a sequence into a dead end: a schema that demands a longer
    run (a pattern of 40 digits) still gets it."""

    __slots__ = ("limits", "t", "digits", "char", "same")

    def __init__(self, limits, tables: RunTables) -> None:
        self.limits, self.t = limits, tables
        self.digits = 0  # trailing ASCII digits of the text so far
        self.char, self.same = -1, 0  # its last byte and how many times it repeats at the end

    def copy(self) -> RunGuard:
        g = RunGuard(self.limits, self.t)
        g.digits, g.char, g.same = self.digits, self.char, self.same
        return g

    def narrow(self, ok: np.ndarray) -> np.ndarray:
        t, lim, bad = self.t, self.limits, []
        md = lim.max_digits
        if md is not None and self.digits + t.max_dlead > md:  # tokens whose leading digits extend the run too far
            ids = t.digit_ids
            bad.append(ids[t.dlead[ids] > md - self.digits])
        mc = lim.max_same_char
        if mc is not None and t.max_clead > mc:  # tokens that alone start with too long a run of one byte
            ids = t.rep_ids
            bad.append(ids[t.clead[ids] > mc])
        if mc is not None and self.same + t.max_clead > mc:  # tokens that continue the text's run too far
            ids = t.by_first.get(self.char)
            if ids is not None:
                bad.append(ids[t.clead[ids] > mc - self.same])
        ids = np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)
        ids = ids[ids < len(ok)]
        if not ok[ids].any():
            return ok
        narrowed = ok.copy()
        narrowed[ids] = False
        return narrowed if narrowed.any() else ok

    def advance(self, token: int) -> None:
        t = self.t
        if token >= len(t.first) or t.first[token] < 0:  # special/empty: the text does not change
            return
        self.digits = self.digits + t.dlead[token] if t.dall[token] else int(t.dtrail[token])
        if t.call[token] and t.first[token] == self.char:
            self.same += int(t.clead[token])
        else:
            self.char, self.same = int(t.last[token]), int(t.ctrail[token])


class ConstraintState:
    """One sequence's position in the grammar (see the module docstring)."""

    __slots__ = ("matcher", "vocab_size", "guard", "_words", "_bytes", "error")

    def __init__(self, matcher, vocab_size: int, guard: RunGuard | None = None) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.guard = guard
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._bytes = self._words.view(np.uint8)
        self.error: str | None = None

    def allowed(self) -> np.ndarray:
        """Bool [vocab_size]: the tokens the grammar allows next."""
        if self.error is not None:
            return np.zeros(self.vocab_size, dtype=bool)
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        ok = np.unpackbits(self._bytes, bitorder="little")[:self.vocab_size].view(bool)
        return ok if self.guard is None else self.guard.narrow(ok)

    def process(self, seq: list[int], scores: Tensor) -> Tensor:
        ok = torch.from_numpy(self.allowed())
        n = min(scores.shape[-1], self.vocab_size)
        scores[..., :n].masked_fill_(~ok[:n], float("-inf"))
        if scores.shape[-1] > n:
            scores[..., n:] = float("-inf")
        return scores

    def advance(self, token: int) -> None:
        if self.error is None and not self.matcher.consume_token(int(token)):
            self.error = self.matcher.get_error() or f"token {token} is not allowed here"
        if self.guard is not None:
            self.guard.advance(int(token))

    def fork(self) -> ConstraintState:
        st = ConstraintState(self.matcher.deep_copy(), self.vocab_size,
                             None if self.guard is None else self.guard.copy())
        st.error = self.error
        return st

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (the grammar would allow an end here)."""
        return self.error is None and self.matcher.is_accepting()
