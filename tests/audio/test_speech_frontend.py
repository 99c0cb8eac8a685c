"""Text front end: normalisation, sentence splitting (whole and incremental), clauses, Piper's id convention, and
espeak-ng itself where it is installed."""

from __future__ import annotations

import random

import pytest

from aigckit.audio import espeak
from aigckit.audio.frontend import clauses, phonemes_to_ids, sentence_utterances
from aigckit.audio.normalize import (SentenceSplitter, normalize, number_words, ordinal_words, split_sentences,
                                     year_words)
from audioutil import ID_MAP, letters

needs_espeak = pytest.mark.skipif(not espeak.available(), reason="espeak-ng not installed (apt-get install espeak-ng)")


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (99, "ninety-nine"), (101, "one hundred one"),
    (1234, "one thousand two hundred thirty-four"), (2_000_005, "two million five"), (-7, "minus seven"),
    (10**15, "one zero zero zero zero zero zero zero zero zero zero zero zero zero zero zero"),
])
def test_number_words(n, words):
    assert number_words(n) == words


def test_ordinals_and_years():
    assert [ordinal_words(n) for n in (1, 2, 3, 5, 12, 20, 21, 100)] == [
        "first", "second", "third", "fifth", "twelfth", "twentieth", "twenty-first", "one hundredth"]
    assert [year_words(y) for y in (1999, 1905, 2005, 2024, 1800, 2000, 3000)] == [
        "nineteen ninety-nine", "nineteen oh five", "two thousand five", "twenty twenty-four", "eighteen hundred",
        "two thousand", "three thousand"]


@pytest.mark.parametrize("text, said", [
    ("Dr. Smith paid $3.50 for 12 apples.", "Doctor Smith paid three dollars and fifty cents for twelve apples."),
    ("It costs $1.5 million, a 20% rise.", "It costs one point five million dollars, a twenty percent rise."),
    ("Meet me at 10:30 p.m. or 7am", "Meet me at ten thirty p m or seven a m"),
    ("The 21st century; the 1990s.", "The twenty-first century; the nineteen nineties."),
    ("It was -5°C and 30 km/h.", "It was minus five degrees Celsius and thirty kilometers per hour."),
    ("Wait... what (really)?", "Wait, what, really?"),
    ("A — B – C", "A, B, C"),
    ("**Bold** and `code` [a link](http://x.org)", "Bold and code a link"),
    ("1,234,567 and 3.14 and 007", "one million two hundred thirty-four thousand five hundred sixty-seven and "
     "three point one four and zero zero seven"),
    ("pages 10-20 & No. 5", "pages ten to twenty and number five"),
    ("U.S.A. vs J. K. Rowling", "U S A versus J K Rowling"),
])
def test_normalize(text, said):
    assert normalize(text) == said


def test_normalize_never_raises_on_odd_input():
    rng = random.Random(0)
    alphabet = "aZ09 .,;:!?$%&()-–—…'\"*_#@/\\\n\t€£¥°😀日本語\u200b\x00\x07ﬁ"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert isinstance(normalize(s), str)


TEXT = ("Hello there. Dr. Smith said hi! Is it 3.5 or 4? Mr. J. K. Rowling writes, e.g. novels. "
        "Then the U.S. Army came.\n\nA new paragraph\n1. First item.\n2. Second item\nThe end")


def test_split_sentences():
    got = [(s.text, s.paragraph) for s in split_sentences(TEXT)]
    assert got == [("Hello there.", False), ("Dr. Smith said hi!", False), ("Is it 3.5 or 4?", False),
                   ("Mr. J. K. Rowling writes, e.g. novels.", False), ("Then the U.S.", False),
                   ("Army came.", False), ("A new paragraph", True), ("1. First item.", False),
                   ("2. Second item", False), ("The end", False)]


@pytest.mark.parametrize("text, max_chars", [(TEXT, 2000), (TEXT + " " + "word " * 60 + "end. Done.", 40)])
def test_incremental_splitting_equals_whole(text, max_chars):
    rng = random.Random(1)
    whole = SentenceSplitter(max_chars)
    whole = whole.feed(text) + whole.close()
    assert all(len(s.text) <= max_chars for s in whole)
    for _ in range(30):
        s, out, i = SentenceSplitter(max_chars), [], 0
        while i < len(text):
            j = i + rng.randint(1, 12)
            out += s.feed(text[i:j])
            i = j
        assert out + s.close() == whole


def test_splitter_holds_back_until_it_knows_and_bounds_its_buffer():
    s = SentenceSplitter(max_chars=50)
    assert s.feed("It is 3.") == []  # could be 3.5
    assert [x.text for x in s.feed("5 now. Next")] == ["It is 3.5 now."]
    assert s.feed(" word" * 30) != []  # no end in sight: cut at a space once past max_chars
    assert len(s.buf) <= 50


def test_clauses_and_ids():
    assert clauses("Hello, world; ok: yes?! fine") == [("Hello", ","), ("world", ";"), ("ok", ":"), ("yes", "?"),
                                                         ("fine", ".")]
    ids, unknown = phonemes_to_ids("ab c", ID_MAP)
    p = ID_MAP["_"][0]
    assert ids == [ID_MAP["^"][0], p, ID_MAP["a"][0], p, ID_MAP["b"][0], p, ID_MAP[" "][0], p, ID_MAP["c"][0], p,
                   ID_MAP["$"][0]]
    ids2, unknown2 = phonemes_to_ids("a☃b", ID_MAP)  # unknown symbols are skipped, reported
    assert unknown2 == ["☃"] and ids2 == ids[:6] + [ID_MAP["$"][0]]
    # NFD: a precomposed nasal vowel becomes base + combining tilde, both phonemes of their own
    ids3, _ = phonemes_to_ids("ã", ID_MAP)
    assert ids3[2] == ID_MAP["a"][0] and ids3[4] == ID_MAP["\u0303"][0]


def test_sentence_utterances_keep_punctuation_and_bound_length():
    utts = sentence_utterances("Hello, world!", phonemize=lambda t: letters(t), id_map=ID_MAP)
    assert len(utts) == 1 and utts[0].phonemes == "hello, world!"
    long = ", ".join(["one two three four five six"] * 40) + "."
    utts = sentence_utterances(long, phonemize=lambda t: letters(t), id_map=ID_MAP, pause_before=0.2,
                               max_phonemes=100)
    assert len(utts) > 5 and all(len(u.phonemes) <= 100 for u in utts)
    assert utts[0].pause_before == 0.2 and all(u.pause_before == 0 for u in utts[1:])
    # every word is said once, in order (the punctuation stays with its clause)
    assert " ".join(u.phonemes for u in utts).replace(",", "").replace(".", "").split() == letters(long).split()
    no_words = sentence_utterances("!!! ...", phonemize=lambda t: letters(t), id_map=ID_MAP)
    assert no_words == []


@needs_espeak
def test_espeak_phonemes_like_piper():
    assert espeak.phonemize("Hello world") == "həlˈoʊ wˈɜːld"
    utts = sentence_utterances("Hello, world. ", phonemize=lambda t: espeak.phonemize(t, "en-us"), id_map=ID_MAP)
    assert utts[0].phonemes == "həlˈoʊ, wˈɜːld."
    # odd characters never crash the phonemiser (espeak names or skips them)
    for text in ["😀", "日本語", "\x00\x07", "ﬁ", "a" * 5000, "", "   "]:
        assert isinstance(espeak.phonemize(text), str)


@needs_espeak
def test_espeak_is_safe_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"Sentence number {i} is here." for i in range(40)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(espeak.phonemize, texts))
    assert got == [espeak.phonemize(t) for t in texts]
