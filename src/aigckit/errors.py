"""Errors that are the user's to fix (bad input, missing files).

The CLI prints these as one line on stderr with exit code 2; the server turns them into HTTP 400 and fills
OpenAI's ``param`` field from :attr:`AigcError.param`. ``AigcError`` subclasses ``ValueError`` so library users can
catch either.
"""

from __future__ import annotations


class AigcError(ValueError):
    """Base class for errors caused by input the user can correct.

    ``param`` names the offending parameter when there is one (``AigcError("top_p must be in (0, 1], got 2.0",
    param="top_p")``); it is set where the error is raised, never guessed from the message."""

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(AigcError, FileNotFoundError):
    """A model name or path does not resolve to files on disk."""


class UnsupportedFormatError(AigcError):
    """A weights file in a format we refuse to load (e.g. pickle-based .bin/.pt)."""


class CorruptFileError(AigcError):
    """A file exists but its contents are not what they claim to be."""


class QueueFull(AigcError):
    """Too many requests are waiting for a model right now: retry later (the server answers 429 with Retry-After).

    A request that could never fit (it needs more queue places than the queue has) is a plain ``AigcError``."""


class GenerationError(RuntimeError):
    """Generating one request failed inside the engine (a bug or a numerical failure, not the user's input).

    Raised to that request's caller alone; the other requests of a shared batch go on. The server answers 500 with
    this message (in-band once a stream has started)."""


class DistributedError(AigcError):
    """A multi-process job (torchrun) cannot go on: another rank died, hung past the timeout, or could not join.

    The message names this rank and what failed; the CLI exits non-zero and the last checkpoint stays intact."""
