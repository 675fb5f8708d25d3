"""qsnet ingest: DICOM in, versioned stores out; also the multi-site phantom (the embedded default data).

Public API (imported lazily, so `qsnet --help` stays fast):
    ingest.read_series(paths) -> (array, affine_lps, meta)
    ingest.open_store(path) -> ExamStore
"""

__version__ = "0.1.0"
__all__ = ["read_series", "open_store", "first_line", "__version__"]


def first_line(exc: BaseException) -> str:
    """An exception as the reason part of a one-line error: its message's first line, or its
    type's name where the message is empty (`"".splitlines()` has no first line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def __getattr__(name):
    if name == "read_series":
        from ingest.reader import read_series

        return read_series
    if name == "open_store":
        from ingest.store import open_store

        return open_store
    raise AttributeError(f"module 'ingest' has no attribute {name!r}")
