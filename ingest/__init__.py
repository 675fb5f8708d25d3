"""qsnet ingest: DICOM in, versioned stores out; also the multi-site phantom (the embedded default data)."""

__version__ = "0.1.0"
