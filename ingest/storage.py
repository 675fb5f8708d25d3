"""Locations that are either a local path or an fsspec URL (``s3://bucket/key``).

On a cluster the workers share no filesystem: prepared stores, model registries and Ray
Train's run storage live in object storage, and every stage takes a URL wherever it takes a
folder. Credentials come only from the environment or the standard config files (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or ``~/.aws/credentials``; an S3-compatible
server is named by ``AWS_ENDPOINT_URL``), never from the repository.

Model registries and reports are small: a stage that writes them to a URL writes into a local
folder and uploads it when it succeeds (:func:`staged`); one that reads them downloads them
first (:func:`mirror`). Zarr stores are read in place, slice by slice (``zarr`` opens URLs).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ingest import first_line

__all__ = ["StorageError", "is_url", "location", "name_parts", "join", "list_stores", "read_json",
           "read_bytes", "write_bytes", "exists", "check_access", "mirror", "upload", "staged",
           "pyarrow_filesystem"]

# a client that gives up quickly: a wrong endpoint or a dead network must fail a command in
# seconds with one line, not retry for minutes (botocore's default is 60 s x 5 attempts)
_CLIENT = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}}


class StorageError(OSError):
    """A location that cannot be used: missing credentials, unreachable endpoint, no such bucket."""


def is_url(p: Any) -> bool:
    s = str(p)
    return "://" in s and not s.startswith("file://")


def location(p: Any) -> str | Path:
    """A URL stays a string (``Path`` would fold ``s3://`` into ``s3:/``); anything else is a Path."""
    if is_url(p):
        return str(p).rstrip("/")
    s = str(p)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def join(base: Any, *parts: str) -> str | Path:
    base = location(base)
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return posixpath.join(base, *parts)


def name_parts(p: Any) -> tuple[str, str]:
    """``(parent folder name, stem)`` of a store location: ``(site, subject)`` of ``<site>/<subject>.zarr``."""
    pp = PurePosixPath(str(p).split("://", 1)[-1].rstrip("/"))
    return pp.parent.name, pp.stem


def _fs(url: str):
    import fsspec

    scheme = url.split("://", 1)[0]
    opts: dict = {}
    if scheme in ("s3", "s3a"):
        opts["config_kwargs"] = dict(_CLIENT)
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _url(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


def check_access(url: str, write: bool = False) -> None:
    """Fail with one line naming ``url`` when it cannot be read (or written): no credentials,
    endpoint unreachable, bucket missing or access denied. Cheap: one listing call."""
    if not is_url(url):
        return
    scheme = _scheme(url)
    if scheme in ("s3", "s3a"):
        try:
            import botocore.session
        except ImportError:
            raise StorageError(f"{url}: s3:// needs s3fs (pip install s3fs)") from None
        if botocore.session.get_session().get_credentials() is None:
            raise StorageError(f"{url}: no storage credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(or a profile in ~/.aws/credentials); an S3-compatible server also needs "
                               "AWS_ENDPOINT_URL")
    try:
        fs, path = _fs(url)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: no filesystem for this URL ({exc})") from None
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StorageError(f"{url}: bucket {bucket!r} does not exist") from None
    except PermissionError as exc:
        raise StorageError(f"{url}: access denied ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp raise many kinds for one cause
        raise StorageError(f"{url}: storage not reachable ({_first_line(exc)})") from None
    if write:
        probe = posixpath.join(path, f".qsnet-write-check-{os.getpid()}")
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{url}: not writable ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    # cloud SDK errors can carry a whole XML or JSON body on their first line
    return first_line(exc)[:200]


def exists(p: Any) -> bool:
    if not is_url(p):
        return location(p).exists()
    fs, path = _fs(str(p))
    return fs.exists(path)


def read_bytes(p: Any) -> bytes:
    if not is_url(p):
        return location(p).read_bytes()
    fs, path = _fs(str(p))
    return fs.cat_file(path)


def read_json(p: Any) -> Any:
    return json.loads(read_bytes(p))


def write_bytes(p: Any, data: bytes) -> None:
    """Atomic on both: a local file is renamed into place, an object PUT is all or nothing."""
    if is_url(p):
        fs, path = _fs(str(p))
        fs.pipe_file(path, data)
        return
    path = location(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def list_stores(root: Any) -> list[str | Path]:
    """The ``<site>/<subject>.zarr`` stores under ``root``, sorted; URLs stay URLs."""
    if not is_url(root):
        root = location(root)
        return sorted(p for p in root.glob("*/*.zarr") if p.is_dir())
    fs, path = _fs(str(root))
    metas = fs.glob(posixpath.join(path, "*", "*.zarr", "zarr.json"))
    return sorted(_url(fs, posixpath.dirname(m)) for m in metas)


def mirror(url: str, cache: Path | None = None) -> Path:
    """A local copy of the folder tree at ``url`` (a model registry, a reports folder)."""
    fs, path = _fs(url)
    dest = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="qsnet-mirror-"))
    dest.mkdir(parents=True, exist_ok=True)
    if not fs.exists(path):
        return dest
    for f in fs.find(path):
        rel = posixpath.relpath(f, path)
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(out))
    return dest


def upload(local: Path, url: str) -> int:
    """Upload every file under ``local`` to ``url``. A model's card is its commit: the card already
    there is removed first, the weights go up, the new card last. A reader sees a card with its own
    weights or no card (the model is being written; an upload cut short leaves it so until the
    next one), never an old card beside new weights, whose sha256 check would fail for good.
    Returns the number of files."""
    fs, path = _fs(url)
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file() and ".tmp-" not in p.name)

    def remote(f: Path) -> str:
        return posixpath.join(path, f.relative_to(local).as_posix())

    # each file with the model whose card stands nearest above it (its weights, also in sub-folders)
    members: dict[Path, list[Path]] = {f.parent: [] for f in files if f.name == "card.json"}
    for f in files:
        folder = next((p for p in f.parents if p in members), None)
        if folder is None:  # not part of a model (reports): as it comes
            fs.put_file(str(f), remote(f))
        elif f.name != "card.json" or f.parent != folder:
            members[folder].append(f)
    # one model at a time, and only the ones that changed: a registry mirrored and uploaded whole
    # (finetune's) must not take every other model offline while it goes up
    for folder in sorted(members):
        card = folder / "card.json"
        try:
            if fs.cat_file(remote(card)) == card.read_bytes():
                continue
            fs.rm_file(remote(card))
        except FileNotFoundError:
            pass
        for f in members[folder]:
            fs.put_file(str(f), remote(f))
        fs.put_file(str(card), remote(card))
    return len(files)


@contextlib.contextmanager
def staged(p: Any, download: bool = False) -> Iterator[Path]:
    """A local folder to write ``p`` through: ``p`` itself when local; for a URL a temporary
    folder (with the current content when ``download``) uploaded only if the block succeeds."""
    if not is_url(p):
        yield location(p)
        return
    check_access(str(p), write=True)
    tmp = Path(tempfile.mkdtemp(prefix="qsnet-staged-"))
    try:
        local = mirror(str(p), tmp / "d") if download else tmp / "d"
        local.mkdir(parents=True, exist_ok=True)
        yield local
        upload(local, str(p))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pyarrow_filesystem(url: str):
    """``(pyarrow filesystem, path)`` for Ray Train's ``RunConfig(storage_filesystem=...)``: the
    same fsspec client as everything else, so ``AWS_ENDPOINT_URL`` and the credentials chain
    apply to checkpoints too."""
    import pyarrow.fs

    fs, path = _fs(url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
