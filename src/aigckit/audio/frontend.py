"""Sentence -> phonemes -> the voice's phoneme ids (Piper's conventions).

Per sentence: normalise (``normalize``), split into clauses at , ; : . ! ?, phonemise each clause with espeak-ng, and
re-attach the clause's punctuation (a space after , ; : as Piper does), so the voice hears the pauses it was trained
with. Phonemes are Unicode code points after NFD decomposition (combining marks are phonemes of their own), mapped
through the voice's ``phoneme_id_map``: ``^`` (BOS), then each phoneme followed by the pad ``_``, then ``$`` (EOS).
Phonemes the voice does not know are skipped and counted, never an error.

Sentences longer than ``max_phonemes`` are cut at clause ends, or at word ends if one clause is itself too long,
so memory and latency stay bounded whatever the input.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

from aigckit.audio.normalize import normalize

BOS, EOS, PAD = "^", "$", "_"
CLAUSE_PUNCT = ",;:.!?"
_CLAUSE = re.compile(r"([^,;:.!?]*)([,;:.!?]+|$)")
_LANG_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9]+)?\)")  # espeak's (fr) ... (en) markers around foreign words


@dataclass(frozen=True)
class Utterance:
    """One synthesis unit: a sentence (or a piece of a long one) as phoneme ids."""

    text: str  # normalised text
    phonemes: str
    ids: list[int]
    pause_before: float = 0.0  # seconds of silence before it (sentence / paragraph breaks)
    unknown: tuple[str, ...] = field(default=())  # phonemes the voice has no id for (skipped)


def phonemes_to_ids(phonemes: str, id_map: dict[str, list[int]]) -> tuple[list[int], list[str]]:
    """Piper's encoding: BOS, then (phoneme ids, PAD) per phoneme, then EOS. Returns (ids, skipped phonemes)."""
    ids = list(id_map[BOS]) + list(id_map[PAD])
    unknown = []
    for ch in unicodedata.normalize("NFD", phonemes):
        if ch in id_map:
            ids += id_map[ch]
            ids += id_map[PAD]
        else:
            unknown.append(ch)
    ids += id_map[EOS]
    return ids, unknown


def clauses(text: str) -> list[tuple[str, str]]:
    """Normalised sentence -> [(clause words, its punctuation)]; the last clause always ends in . ! or ?."""
    out = []
    for m in _CLAUSE.finditer(text):
        words, punct = m.group(1).strip(), m.group(2)
        if not words and not punct:
            continue
        # keep one mark per clause: '?!' -> '?', '...' -> '.'
        mark = next((p for p in "?!.;:," if p in punct), "")
        if words:
            out.append((words, mark))
        elif out and mark and mark in ".!?":
            out[-1] = (out[-1][0], mark)
    if out and out[-1][1] not in (".", "!", "?"):
        out[-1] = (out[-1][0], "." if out[-1][1] in ("", ",", ";", ":") else out[-1][1])
    return out


def clause_phonemes(words: str, mark: str, phonemize: Callable[[str], str]) -> str:
    ph = _LANG_SWITCH.sub("", phonemize(words)).strip()
    ph = re.sub(r"\s+", " ", ph)
    if not ph:
        return ""
    return ph + mark + (" " if mark in ",;:" else "")


def sentence_utterances(sentence: str, *, phonemize: Callable[[str], str], id_map: dict[str, list[int]],
                        pause_before: float = 0.0, max_phonemes: int = 400) -> list[Utterance]:
    """One raw sentence -> one or more utterances (more only when it is longer than ``max_phonemes``)."""
    text = normalize(sentence)
    pieces: list[tuple[str, str]] = []  # (text, phonemes) of each utterance
    cur_text: list[str] = []
    cur_ph = ""
    for words, mark in clauses(text):
        ph = clause_phonemes(words, mark, phonemize)
        if not ph:
            continue
        for wtext, wph in _split_long(words + mark, ph, max_phonemes):
            if cur_ph and len(cur_ph) + len(wph) > max_phonemes:
                pieces.append((" ".join(cur_text), cur_ph.strip()))
                cur_text, cur_ph = [], ""
            cur_text.append(wtext)
            cur_ph += wph
    if cur_ph.strip():
        pieces.append((" ".join(cur_text), cur_ph.strip()))
    out = []
    for i, (t, ph) in enumerate(pieces):
        ids, unknown = phonemes_to_ids(ph, id_map)
        out.append(Utterance(t, ph, ids, pause_before if i == 0 else 0.0, tuple(unknown)))
    return out


def _split_long(text: str, ph: str, max_phonemes: int) -> list[tuple[str, str]]:
    """A clause whose phonemes exceed the limit -> pieces cut at word (space) boundaries."""
    if len(ph) <= max_phonemes:
        return [(text, ph)]
    out, cur = [], ""
    for word in ph.split(" "):
        if cur and len(cur) + 1 + len(word) > max_phonemes:
            out.append(cur + " ")
            cur = ""
        while len(word) > max_phonemes:  # one absurdly long "word": hard cut
            out.append(word[:max_phonemes])
            word = word[max_phonemes:]
        cur = f"{cur} {word}" if cur else word
    if cur:
        out.append(cur)
    return [(text if i == 0 else "", p) for i, p in enumerate(out)]
