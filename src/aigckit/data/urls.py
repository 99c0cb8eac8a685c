"""Small helpers for dataset arguments given as fsspec URLs (paths, ``file://``, ``zip://a.jsonl::b.zip``, ...)."""

from __future__ import annotations

from aigckit.errors import AigcError


def file_name(url: str) -> str:
    """The lower-cased name of the file a URL points at: the first part of a chained URL (``zip://a.jsonl::b.zip``
    names ``a.jsonl``), for choosing a reader by its suffix."""
    return url.split("::", 1)[0].lower()


def pyarrow_parquet():
    """``pyarrow.parquet``, or an error that says how to get it (Parquet input is optional)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AigcError("reading Parquet needs pyarrow: pip install pyarrow (or aigckit[parquet])",
                        param="input") from None
    return pq
