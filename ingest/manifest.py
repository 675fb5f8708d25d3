"""The ingest manifest: one row per input file, always (``stores/manifest.csv``).

Columns (the "Manifest contract" of DESIGN.md): ``path`` (relative to the data root, POSIX
separators), ``size`` (bytes), ``sha256`` (of the file), ``status`` (``ingested`` /
``quarantined`` / ``ignored``), ``reason`` (why, in words a person can act on; required
unless ingested), ``site``, ``subject`` (the pseudonym, never the real ID), ``series`` (the
pseudonymised series id), ``role``.

The CSV is deterministic: rows sorted by path, a fixed header, ``\\n`` line ends, UTF-8, and
it is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

__all__ = ["FIELDS", "STATUSES", "Row", "check_coverage", "file_sha256", "read_manifest", "write_manifest"]

FIELDS = ("path", "size", "sha256", "status", "reason", "site", "subject", "series", "role")
STATUSES = ("ingested", "quarantined", "ignored")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _one_line(text: str) -> str:
    # Reasons often come from exception messages, which may span lines.
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Row:
    """One input file. ``sha256`` may be empty only for a file that could not be read
    (then it cannot be ``ingested``); an ``ingested`` row names at least its site and
    subject (series and role where the file has them: phantom ground truth has no series).
    Text fields are collapsed to one line."""

    path: str
    size: int
    sha256: str
    status: str
    reason: str = ""
    site: str = ""
    subject: str = ""
    series: str = ""
    role: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "size":
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"manifest row {self.path!r}: size must be a non-negative int, got {v!r}")
            elif not isinstance(v, str):
                raise TypeError(f"manifest row {self.path!r}: {f.name} must be a str, got {type(v).__name__}")
        for name in ("reason", "site", "subject", "series", "role"):
            object.__setattr__(self, name, _one_line(getattr(self, name)))
        p = self.path
        pp = PurePosixPath(p)
        # a backslash is an ordinary character in a POSIX name (a Windows zip unpacked here)
        if not p or pp.is_absolute() or ".." in pp.parts or str(pp) != p or p == ".":
            raise ValueError(f"manifest row {p!r}: path must be a normalised relative POSIX path")
        if self.status not in STATUSES:
            raise ValueError(f"manifest row {p!r}: status {self.status!r} not one of {', '.join(STATUSES)}")
        if self.sha256 and not _SHA_RE.match(self.sha256):
            raise ValueError(f"manifest row {p!r}: sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if self.status == "ingested":
            missing = [n for n in ("sha256", "site", "subject") if not getattr(self, n)]
            if missing:
                raise ValueError(f"manifest row {p!r}: an ingested row needs {', '.join(missing)}")
        elif not self.reason:
            raise ValueError(f"manifest row {p!r}: a {self.status} row needs a reason")

    @classmethod
    def for_file(cls, root: Path | str, file: Path | str, status: str, reason: str = "", **kw: str) -> Row:
        """A row for ``file`` (relative path to ``root``, size and sha256 computed). An
        unreadable file gets an empty sha256, so it can still be quarantined with a row."""
        root, file = Path(root), Path(file)
        rel = (file if not file.is_absolute() else file.relative_to(root)).as_posix()
        full = root / rel
        try:
            size, digest = full.stat().st_size, file_sha256(full)
        except OSError as exc:
            if status == "ingested":
                raise
            size, digest = 0, ""
            reason = reason or f"unreadable: {exc.strerror or exc}"
        return cls(path=rel, size=size, sha256=digest, status=status, reason=reason, **kw)


def file_sha256(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def code_hash(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of source files: which version of the code made an
    output, so that a changed method never passes off what the old one wrote as its own."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _encode(rows: Iterable[Row]) -> bytes:
    rows = sorted(rows, key=lambda r: r.path)
    seen: set[str] = set()
    for r in rows:
        if not isinstance(r, Row):
            raise TypeError(f"manifest rows must be Row, got {type(r).__name__}")
        if r.path in seen:
            raise ValueError(f"manifest: duplicate row for {r.path!r} (one row per input file)")
        seen.add(r.path)
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([getattr(r, f) for f in FIELDS])
    # A file name that is not UTF-8 (legal on POSIX) is written as its own bytes, as tar and git
    # do: its row still names the file, and reads back (read_manifest) as the name os.scandir gives
    return buf.getvalue().encode("utf-8", errors="surrogateescape")


def write_manifest(path: Path | str, rows: list[Row]) -> None:
    """Write ``rows`` as CSV, sorted by path, atomically; the same rows give the same bytes."""
    path = Path(path)
    data = _encode(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(path: Path | str) -> list[Row]:
    """Read and validate a manifest; errors name the file and line."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty manifest (no header)") from None
        if tuple(header) != FIELDS:
            raise ValueError(f"{path}: header {header} != {list(FIELDS)}")
        rows = []
        for rec in reader:
            line = reader.line_num
            if len(rec) != len(FIELDS):
                raise ValueError(f"{path}:{line}: {len(rec)} fields, expected {len(FIELDS)}")
            d = dict(zip(FIELDS, rec))
            try:
                d["size"] = int(d["size"])
                rows.append(Row(**d))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
    paths = [r.path for r in rows]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"{path}: duplicate rows for {', '.join(dup[:5])}")
    return rows


def check_coverage(rows: Iterable[Row], input_files: Iterable[str]) -> None:
    """Raise unless the rows are exactly the input files (relative POSIX paths)."""
    have = {r.path for r in rows}
    want = set(input_files)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} input file(s) without a row (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} row(s) for no input file (e.g. {extra[0]})")
        raise ValueError("manifest does not cover the input: " + "; ".join(parts))
