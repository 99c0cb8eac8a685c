"""Errors that are the user's to fix (bad input, missing files).

The CLI prints these as one line on stderr with exit code 2; the server turns them into HTTP 400.
``AigcError`` subclasses ``ValueError`` so library users can catch either.
"""

from __future__ import annotations


class AigcError(ValueError):
    """Base class for errors caused by input the user can correct."""


class ModelNotFoundError(AigcError, FileNotFoundError):
    """A model name or path does not resolve to files on disk."""


class UnsupportedFormatError(AigcError):
    """A weights file in a format we refuse to load (e.g. pickle-based .bin/.pt)."""


class CorruptFileError(AigcError):
    """A file exists but its contents are not what they claim to be."""
