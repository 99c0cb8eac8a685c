"""Text -> IPA phonemes with espeak-ng, the phonemiser Piper voices were trained on.

espeak-ng is GPL-3.0 software. aigckit does not bundle or link it: it is loaded at run time, only when speech is
synthesised, from the system (Debian package ``espeak-ng``): through its C library with ctypes, or, where only the
program is installed, by running ``espeak-ng``. Everything else in aigckit works without it.

The library keeps global state (one voice at a time) and is not thread-safe, so every call holds one lock.
``espeak_TextToPhonemes`` returns one clause per call and drops punctuation; the caller (``frontend``) therefore
splits clauses itself and re-attaches the punctuation, which is what Piper's own phonemiser does with the clause
terminators that newer espeak-ng versions report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import threading
from functools import lru_cache

from aigckit.errors import AigcError

AUDIO_OUTPUT_SYNCHRONOUS = 0x02
espeakINITIALIZE_DONT_EXIT = 0x8000
espeakCHARS_UTF8 = 1
espeakPHONEMES_IPA = 0x02

INSTALL_HINT = ("speech needs espeak-ng for phonemes (GPL, loaded at run time, not bundled): "
                "apt-get install espeak-ng, or set AIGC_ESPEAK_LIB to a libespeak-ng.so")

_LOCK = threading.Lock()


class _Library:
    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        data = os.environ.get("AIGC_ESPEAK_DATA")
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode() if data else None,
                                     espeakINITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise AigcError(f"espeak-ng ({path}) failed to initialise (its data files missing?); {INSTALL_HINT}")
        self.lib, self.path, self.voice = lib, path, None

    def phonemize(self, text: str, voice: str) -> list[str]:
        if self.voice != voice:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise AigcError(f"espeak-ng has no voice {voice!r}")
            self.voice = voice
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        out = []
        while ptr.value:  # one clause per call; espeak advances ptr and sets it to NULL at the end
            res = self.lib.espeak_TextToPhonemes(ctypes.byref(ptr), espeakCHARS_UTF8, espeakPHONEMES_IPA)
            if res:
                out.append(res.decode("utf-8", errors="replace"))
        return out


class _Program:
    def __init__(self, path: str):
        self.path = path

    def phonemize(self, text: str, voice: str) -> list[str]:
        r = subprocess.run([self.path, "-q", "--ipa", "-v", voice], input=text, capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise AigcError(f"espeak-ng failed: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")
        return [line for line in r.stdout.splitlines()]


@lru_cache(maxsize=1)
def _backend() -> _Library | _Program:
    candidates = [os.environ.get("AIGC_ESPEAK_LIB"), ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1"]
    for path in candidates:
        if not path:
            continue
        try:
            return _Library(path)
        except OSError:  # not found or not loadable here: try the next candidate, then the program
            continue
    prog = shutil.which("espeak-ng")
    if prog:
        return _Program(prog)
    raise AigcError(INSTALL_HINT)


def available() -> bool:
    """Whether espeak-ng can be loaded (the library or the program)."""
    try:
        _backend()
    except AigcError:
        return False
    return True


def backend_name() -> str:
    b = _backend()
    return f"libespeak-ng ({b.path})" if isinstance(b, _Library) else f"espeak-ng program ({b.path})"


def phonemize(text: str, voice: str = "en-us") -> str:
    """IPA phonemes of a text without clause punctuation (clauses espeak finds are joined by a space)."""
    if not text.strip():
        return ""
    with _LOCK:
        parts = _backend().phonemize(text, voice)
    return " ".join(p.strip() for p in parts if p.strip())
