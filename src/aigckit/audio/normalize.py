"""English text normalisation for speech: what a reader would say, in words, before phonemisation.

- sentence splitting that knows abbreviations, initials and decimals (``split_sentences``; ``SentenceSplitter`` does
  the same incrementally for text that arrives in pieces, e.g. an LLM's streamed reply);
- numbers (cardinals, decimals, ordinals, years, times, ranges, negative numbers), currency, percentages, units;
- abbreviations (Dr., Mr., e.g., etc.), symbols (&, +, =, @, #, degrees);
- punctuation that means a pause (dashes, ellipses, parentheses, brackets) becomes a comma, which the voice knows;
- markup noise from chat replies (Markdown emphasis, headings, list bullets, links) is dropped.

Everything here is plain Python and deterministic; nothing raises on odd input (unknown characters pass through to
the phonemiser, which spells or skips them).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- number words

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand")]
_MAX_WORDS = 10**15  # larger integers are read digit by digit


def number_words(n: int) -> str:
    """American English cardinal: 123 -> 'one hundred twenty-three', -4 -> 'minus four'."""
    if n < 0:
        return "minus " + number_words(-n)
    if n >= _MAX_WORDS:
        return digit_words(str(n))
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" " + number_words(rest) if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            rest = n % scale
            return number_words(n // scale) + " " + name + (" " + number_words(rest) if rest else "")
    raise AssertionError("unreachable")


def digit_words(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits if d.isdigit())


_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}


def ordinal_words(n: int) -> str:
    """21 -> 'twenty-first'."""
    words = number_words(n)
    head, sep, last = max(words.rpartition(" "), words.rpartition("-"), key=lambda t: len(t[0]))
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def year_words(n: int) -> str:
    """1999 -> 'nineteen ninety-nine', 1905 -> 'nineteen oh five', 2005 -> 'two thousand five', 2024 -> 'twenty
    twenty-four'. Only for 1100..2099 (other numbers read as cardinals)."""
    if not 1100 <= n <= 2099 or 2000 <= n <= 2009 or n % 1000 == 0:
        return number_words(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return number_words(hi) + " hundred"
    return number_words(hi) + " " + (("oh " + _ONES[lo]) if lo < 10 else number_words(lo))


def decimal_words(s: str) -> str:
    """'3.14' -> 'three point one four'; '1,234.5' -> 'one thousand two hundred thirty-four point five'."""
    whole, _, frac = s.replace(",", "").partition(".")
    out = number_words(int(whole)) if whole else "zero"
    return out + (" point " + digit_words(frac) if frac else "")


# ------------------------------------------------------------------------------------------------ abbreviations

# Expanded where followed by a period (case-sensitive keys; the period is consumed).
ABBREVIATIONS = {
    "Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Dr": "Doctor", "Prof": "Professor", "Jr": "Junior",
    "Sr": "Senior", "Mt": "Mount", "Ave": "Avenue", "Rd": "Road", "Blvd": "Boulevard", "Inc": "Incorporated",
    "Ltd": "Limited", "Corp": "Corporation", "Co": "Company", "Dept": "Department", "Gen": "General",
    "Gov": "Governor", "Sen": "Senator", "Rep": "Representative", "Capt": "Captain", "Lt": "Lieutenant",
    "Sgt": "Sergeant", "vs": "versus", "etc": "et cetera", "approx": "approximately", "est": "established",
    "Jan": "January", "Feb": "February", "Mar": "March", "Apr": "April", "Jun": "June", "Jul": "July",
    "Aug": "August", "Sep": "September", "Sept": "September", "Oct": "October", "Nov": "November",
    "Dec": "December", "e.g": "for example", "i.e": "that is", "a.m": "a m", "p.m": "p m",
}
_MONTHS = {"Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec"}  # only before a day
# After these a period never ends the sentence (titles come before a name).
_NEVER_FINAL = {"Mr", "Mrs", "Ms", "Dr", "Prof", "Mt", "St", "Capt", "Lt", "Sgt", "Gen", "Gov", "Sen", "Rep", "vs",
                "e.g", "i.e", "approx"}

_UNITS = {  # symbol after a number -> (singular, plural)
    "km": ("kilometer", "kilometers"), "cm": ("centimeter", "centimeters"), "mm": ("millimeter", "millimeters"),
    "kg": ("kilogram", "kilograms"), "mg": ("milligram", "milligrams"), "lb": ("pound", "pounds"),
    "lbs": ("pound", "pounds"), "oz": ("ounce", "ounces"), "ft": ("foot", "feet"), "mph": ("mile per hour",
    "miles per hour"), "km/h": ("kilometer per hour", "kilometers per hour"), "kph": ("kilometer per hour",
    "kilometers per hour"), "ms": ("millisecond", "milliseconds"), "GB": ("gigabyte", "gigabytes"),
    "MB": ("megabyte", "megabytes"), "KB": ("kilobyte", "kilobytes"), "kB": ("kilobyte", "kilobytes"),
    "TB": ("terabyte", "terabytes"), "GHz": ("gigahertz", "gigahertz"), "MHz": ("megahertz", "megahertz"),
    "kHz": ("kilohertz", "kilohertz"), "Hz": ("hertz", "hertz"), "kW": ("kilowatt", "kilowatts"),
    "°C": ("degree Celsius", "degrees Celsius"),
    "°F": ("degree Fahrenheit", "degrees Fahrenheit"), "°": ("degree", "degrees"), "%": ("percent", "percent"),
}
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
             "€": ("euro", "euros", "cent", "cents"), "¥": ("yen", "yen", "", "")}
_SCALE_WORDS = r"(?:thousand|million|billion|trillion)"

# ----------------------------------------------------------------------------------------------- the rules

_NUM = r"\d{1,3}(?:,\d{3})+|\d+"  # 1,234,567 or 1234567


def _plural(n_text: str, one: str, many: str) -> str:
    return one if n_text.strip() in ("1", "1.0") else many


def _money(m: re.Match) -> str:
    sym, amount, scale = m.group("sym"), m.group("amount"), m.group("scale")
    one, many, cent1, cents = _CURRENCY[sym]
    if scale:
        return f"{decimal_words(amount)} {scale} {many}"
    whole, _, frac = amount.replace(",", "").partition(".")
    words = []
    if int(whole or "0") or not frac:
        words.append(f"{number_words(int(whole or '0'))} {one if whole == '1' else many}")
    if frac and cents:
        c = int((frac + "0")[:2])
        if c:
            words.append(f"{number_words(c)} {cent1 if c == 1 else cents}")
    elif frac:
        return f"{decimal_words(amount)} {many}"
    return " and ".join(words)


def _time(m: re.Match) -> str:
    h, mnt, ampm = int(m.group("h")), int(m.group("m")), m.group("ampm")
    words = number_words(h)
    if mnt == 0:
        words += "" if ampm else " o'clock"
    elif mnt < 10:
        words += " oh " + _ONES[mnt]
    else:
        words += " " + number_words(mnt)
    if ampm:
        words += " " + " ".join(ampm.replace(".", "").lower())
    return words


def _unit(m: re.Match) -> str:
    num, unit = m.group("num"), m.group("unit")
    one, many = _UNITS[unit]
    return f"{_number(num)} {_plural(num, one, many)}"


def _decade(digits: str) -> str:
    """'1990' (from 1990s) -> 'nineteen nineties', '80' (from '80s) -> 'eighties'."""
    words = year_words(int(digits)) if len(digits) == 4 else number_words(int(digits))
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _number(text: str) -> str:
    if "." in text:
        return decimal_words(text)
    n = int(text.replace(",", ""))
    if "," not in text and len(text) == 4 and not text.startswith("0"):
        return year_words(n)
    if text.startswith("0") and len(text) > 1:
        return digit_words(text)  # 007, zip codes, ids
    if len(text.replace(",", "")) > 15:
        return digit_words(text)
    return number_words(n)


_RULES: list[tuple[re.Pattern, object]] = [
    # Markdown / chat noise
    (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),  # [text](url) -> text
    (re.compile(r"https?://\S+"), " link "),
    (re.compile(r"(?m)^\s{0,3}#{1,6}\s+"), ""),  # headings
    (re.compile(r"(?m)^\s*(?:[-*+•]|\d+[.)])\s+"), ""),  # list bullets and numbers at line start
    (re.compile(r"[*_`~]{1,3}(?=\S)|(?<=\S)[*_`~]{1,3}"), ""),  # emphasis markers
    # pauses
    (re.compile(r"\s*(?:\.{3,}|…)\s*(?=\S)"), ", "),  # mid-sentence ellipsis
    (re.compile(r"(?:\.{3,}|…)"), "."),
    (re.compile(r"\s+[-–—]+\s+|—|–"), ", "),  # dashes used as pauses
    (re.compile(r"\s*[(\[{]\s*"), ", "),
    (re.compile(r"\s*[)\]}]\s*(?=[.,;:!?])"), ""),
    (re.compile(r"\s*[)\]}]\s*"), ", "),
    # abbreviations and initials (a sentence-final one keeps its period: it also ends the sentence)
    (re.compile(r"\bSt\.(?=\s+[A-Z])"), "Saint"),
    (re.compile(r"\bSt\."), "Street"),
    (re.compile(r"\bNo\.\s*(?=\d)"), "number "),
    (re.compile(r"\b(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?\s+(?=\d)"),
     lambda m: ABBREVIATIONS[m.group(1)] + " "),
    (re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(set(ABBREVIATIONS) - _MONTHS, key=len, reverse=True))
                + r")\.(\s*$)?"), lambda m: ABBREVIATIONS[m.group(1)] + ("." if m.group(2) is not None else "")),
    (re.compile(r"\b((?:[A-Z]\.){2,})"), lambda m: " ".join(m.group(1).replace(".", ""))),  # U.S.A. -> U S A
    (re.compile(r"\b([A-Z])\.(?=\s+[A-Z])"), r"\1"),  # initials: J. K. Rowling
    # ranges and signs, then money, percentages, units, times
    (re.compile(r"\b(\d{1,3})\s?-\s?(\d{1,3})\b"), lambda m: f"{number_words(int(m.group(1)))} to "
     f"{number_words(int(m.group(2)))}"),
    (re.compile(r"(?<![\w.])-(?=\d)"), "minus "),
    (re.compile(r"\bvs\b\.?"), "versus"),
    (re.compile(r"\b(\d{2,4})s\b|'(\d0)s\b"), lambda m: _decade(m.group(1) or m.group(2))),
    (re.compile(r"(?P<sym>[$£€¥])\s?(?P<amount>(?:" + _NUM + r")(?:\.\d+)?)(?:\s?(?P<scale>" + _SCALE_WORDS + r"))?"),
     _money),
    (re.compile(r"\b(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?:\s?(?P<ampm>[ap]\.?m\.?|[AP]\.?M\.?))?(?!\d)"), _time),
    (re.compile(r"\b(?P<h>1[0-2]|[1-9])\s?(?P<ampm>[ap]\.?m\.?|[AP]\.?M\.?)(?=\s|$|[,;:!?])"),
     lambda m: number_words(int(m.group("h"))) + " " + " ".join(m.group("ampm").replace(".", "").lower())),
    (re.compile(r"(?P<num>(?:" + _NUM + r")(?:\.\d+)?)\s?(?P<unit>" + "|".join(
        re.escape(u) for u in sorted(_UNITS, key=len, reverse=True)) + r")(?![A-Za-z])"), _unit),
    # ordinals, ranges, signs
    (re.compile(r"\s?%"), " percent"),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b"), lambda m: ordinal_words(int(m.group(1)))),
    (re.compile(r"(?<=\d)\s*\+\s*(?=\d)"), " plus "),
    (re.compile(r"\s*=\s*"), " equals "),
    (re.compile(r"\s*&\s*"), " and "),
    (re.compile(r"#(?=\d)"), "number "),
    (re.compile(r"(?<=\w)@(?=\w)"), " at "),
    # plain numbers last
    (re.compile(r"(?<![\d.])(?:" + _NUM + r")(?:\.\d+)?(?![\d])"), lambda m: _number(m.group(0))),
]

_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "‚": "'", "´": "'",
                         "\u00a0": " ", "\u2009": " ", "\u200b": ""})


def normalize(text: str) -> str:
    """One sentence (or any text) -> words to be phonemised, with pause punctuation the voice knows."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    for rx, repl in _RULES:
        text = rx.sub(repl, text)
    text = re.sub(r'["]', "", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # ", ," from nested pauses
    text = re.sub(r"^[\s,;:]+|[\s,;:]+$", "", text)
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class Sentence:
    text: str  # raw text of the sentence (normalise it before phonemising)
    paragraph: bool = False  # a blank line came before it (a longer pause)


_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n")


def _is_boundary(text: str, end: int, nxt: str | None) -> bool:
    """Whether the sentence-end candidate ``text[:end]`` (ending in . ! ? or a newline) really ends a sentence.
    ``nxt`` is the next non-space character after it (None when not known yet / end of text)."""
    chunk = text[:end].rstrip("\"')]")
    if chunk.endswith("\n") or not chunk.endswith("."):
        return True
    if chunk.endswith(".."):
        return True
    word = re.search(r"(\S+)\.$", chunk)
    if word is None:
        return True
    w = word.group(1).lstrip("\"'([")
    if w in _NEVER_FINAL:
        return False
    if w == "No" and nxt is not None and nxt.isdigit():  # "No. 5"
        return False
    line = chunk[chunk.rfind("\n") + 1:].strip()
    if w.isdigit() and line == w + ".":  # "1. " numbering a list item at the start of a line
        return False
    if re.fullmatch(r"[A-Z]", w):  # an initial: J. K. Rowling
        return False
    if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", w) or w in ABBREVIATIONS:
        # U.S., etc., a.m.: a sentence end only if a capitalised word follows
        return nxt is not None and nxt.isupper()
    return True


def split_sentences(text: str) -> list[Sentence]:
    """Split a whole text into sentences (see ``SentenceSplitter`` for text arriving in pieces)."""
    s = SentenceSplitter()
    return s.feed(text) + s.close()


class SentenceSplitter:
    """Incremental sentence splitting: ``feed(piece)`` returns the sentences completed so far, ``close()`` the rest.
    Splitting a text in one go or piece by piece gives the same sentences. Holds only the unfinished sentence."""

    def __init__(self, max_chars: int = 2000):
        self.buf = ""
        self.paragraph = False
        self.max_chars = max_chars  # a sentence with no end in sight is cut at a space past this many characters

    def feed(self, piece: str) -> list[Sentence]:
        self.buf += piece.replace("\r\n", "\n").replace("\r", "\n")
        return self._take(final=False)

    def close(self) -> list[Sentence]:
        out = self._take(final=True)
        rest = self.buf.strip()
        if rest:
            out.append(Sentence(rest, self.paragraph))
        self.buf, self.paragraph = "", False
        return out

    def _take(self, final: bool) -> list[Sentence]:
        out: list[Sentence] = []
        start = 0
        for m in _END.finditer(self.buf):
            end = m.end()
            after = self.buf[end:]
            stripped = after.lstrip()
            nxt = stripped[0] if stripped else None
            if nxt is None and not final:
                break  # need to see what follows (a capital letter, a blank line) before deciding
            if not _is_boundary(self.buf, end, nxt):
                continue
            start = self._cut_long(start, end, out)
            text = self.buf[start:end].strip()
            gap = after[: len(after) - len(stripped)]
            if text:
                out.append(Sentence(text, self.paragraph))
                self.paragraph = False
            if gap.count("\n") + (1 if m.group(0) == "\n" else 0) >= 2:
                self.paragraph = True
            start = end
        start = self._cut_long(start, len(self.buf), out)
        self.buf = self.buf[start:]
        return out

    def _cut_long(self, start: int, end: int, out: list[Sentence]) -> int:
        """While text[start:end] is longer than max_chars, emit its head up to the last space (the same cuts
        whether the text came whole or in pieces). Returns the new start."""
        while end - start > self.max_chars:
            cut = self.buf.rfind(" ", start, start + self.max_chars)
            cut = cut if cut > start else start + self.max_chars
            piece = self.buf[start:cut].strip()
            if piece:
                out.append(Sentence(piece, self.paragraph))
                self.paragraph = False
            start = cut
        return start
