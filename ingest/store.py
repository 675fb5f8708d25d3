"""The exam store: one Zarr v3 store per exam (``<subject>.zarr``), written atomically, read lazily.

Layout (the "Store contract" of DESIGN.md)::

    <subject>.zarr/
        zarr.json                 group metadata; attributes: schema_version, site, subject, ...
        <role>/zarr.json          array metadata; attributes: affine_lps, spacing, ..., sha256
        <role>/c.0.0.0            ONE shard file holding the whole array (c.0.0.0.0 for 4-D)

Every array is ``(Z, Y, X)`` or ``(T, Z, Y, X)``, chunked one axial slice per chunk
(``(1, Y, X)`` / ``(1, 1, Y, X)``), all chunks in a single shard (zarr's ``sharding_indexed``
codec) so one array is one file on disk, each chunk zstd-compressed.

Writing does not go through zarr: the two kinds of file, ``zarr.json`` and the shard, are
written directly (zarr's own write spends more time in its async machinery than in the
compression; tests compare the files with zarr's, byte for byte). Reading goes through zarr, except
:meth:`ExamStore.slice` (and :meth:`ExamStore.read`), which take a fast path for arrays whose
codec configuration is exactly the one written here: zarr 3.1 spends ~2-3 ms on a single
slice read of a local shard, almost all of it in its async machinery (a hop from the
calling thread to zarr's event-loop thread, then three ``asyncio.to_thread`` hops: read the
shard index, read the chunk, zstd-decode it), and it re-reads and re-decodes the shard index
through a codec pipeline on every call. The fast path caches the decoded shard index per
array file, ``os.pread``s exactly the chunk's bytes and zstd-decodes them straight into the
output array: about 0.1-0.3 ms for a 256 x 256 float32 slice. Anything else (another codec
chain, a remote store) falls back to zarr. The fast path is covered by tests that compare it
with zarr's own read.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where a store is read: writing one needs none of zarr
    import zarr

__all__ = [
    "SCHEMA_VERSION",
    "ZSTD_LEVEL",
    "ExamStore",
    "NotAStoreError",
    "open_store",
    "voxel_sha256",
    "write_exam_store",
]

SCHEMA_VERSION = 1
# 1, not zarr's default 3: on the phantom's float32 volumes 30 % less compression time for
# 1.6 % more bytes (ratio 2.47 against 2.51)
ZSTD_LEVEL = 1

# Role names become directory names inside the store: keep them boring.
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_TMP_RE = re.compile(r"\.(?:tmp|old)-(\d+)-([0-9a-f]{8})-[0-9a-f]+$")
# A temporary sibling from another host (shared filesystem) cannot be checked by pid: it is
# removed only once nobody has touched it for this long.
FOREIGN_STALE_S = 3600.0
_MAX_U64 = np.uint64(2**64 - 1)
_RESERVED_ARRAY_ATTRS = ("sha256",)


class NotAStoreError(ValueError):
    """``<path>: not a qsnet store (<why>)``."""

    def __init__(self, path: Any, why: str) -> None:
        super().__init__(f"{path}: not a qsnet store ({why})")
        self.path = path
        self.why = why


# --------------------------------------------------------------------------- helpers


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"attribute value of type {type(obj).__name__} is not JSON ({obj!r})")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _canonical(obj: Mapping[str, Any], what: str) -> dict[str, Any]:
    """JSON-native copy of ``obj`` with keys sorted at every depth (zarr writes keys in the
    order given, so this is what makes ``zarr.json`` deterministic)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what}: attributes must be a mapping, got {type(obj).__name__}")
    try:
        return json.loads(_canonical_json(dict(obj)))
    except ValueError as exc:  # NaN/inf
        raise ValueError(f"{what}: attributes must be finite JSON values ({exc})") from None
    except TypeError as exc:
        raise TypeError(f"{what}: {exc}") from None


def _le_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian spelling of ``dtype`` (what the store's ``bytes`` codec writes)."""
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def voxel_sha256(data: np.ndarray) -> str:
    """sha256 of the C-contiguous, little-endian voxel bytes (the ``sha256`` array attribute)."""
    data = np.asarray(data)
    buf = np.ascontiguousarray(data, dtype=_le_dtype(data.dtype))
    return hashlib.sha256(memoryview(buf).cast("B")).hexdigest()


def _content_hash(
    group_attrs: Mapping[str, Any],
    arrays: Mapping[str, tuple[tuple[int, ...], np.dtype, Mapping[str, Any]]],
) -> str:
    """The store's content hash: sha256 of a canonical JSON of the group attrs and, per array,
    shape, dtype and attrs (which include the voxel sha256). Independent of compression
    level, chunk layout and file bytes: it names the content, not the encoding."""
    doc = {
        "group": dict(group_attrs),
        "arrays": {
            role: {"shape": list(shape), "dtype": _le_dtype(np.dtype(dtype)).str, "attrs": dict(attrs)}
            for role, (shape, dtype, attrs) in arrays.items()
        },
    }
    return hashlib.sha256(_canonical_json(doc).encode()).hexdigest()


def _check_array(role: str, data: Any) -> np.ndarray:
    if not isinstance(role, str) or not _ROLE_RE.match(role):
        raise ValueError(f"array role {role!r}: must match {_ROLE_RE.pattern}")
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"array {role!r}: shape {data.shape}: must be (Z, Y, X) or (T, Z, Y, X)")
    if min(data.shape) < 1:
        raise ValueError(f"array {role!r}: shape {data.shape} has an empty axis")
    if data.dtype.kind not in "biuf":
        raise ValueError(f"array {role!r}: dtype {data.dtype} is not a bool/int/uint/float type")
    # Store little-endian whatever the input's byte order (bytes codec endian "little").
    return np.ascontiguousarray(data, dtype=_le_dtype(data.dtype))


# --------------------------------------------------------------------------- atomic write


def _fsync_path(path: Path, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # e.g. Windows cannot open directories; best effort there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name, directory=False)
        _fsync_path(Path(dirpath), directory=True)


def _linux_boot_time() -> float | None:
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_name(target: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>-<host>-<random>`` next to ``target``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}"


def _process_start_time(pid: int) -> float | None:
    """Epoch seconds at which process ``pid`` started (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[19])  # field 22 "starttime", in clock ticks since boot
        boot = _linux_boot_time()
        if boot is None:
            return None
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        return started if started <= time.time() + 1.0 else None  # clock skew: unknown
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _is_stale(tmp: Path) -> bool:
    """A temporary sibling is stale when the process that made it is gone: its pid is not
    running, or the pid now belongs to a process that started after the directory was last
    modified (pid reuse, e.g. every container restart reuses the same pids). One made on
    another host, or with an unknown name, only after FOREIGN_STALE_S without changes."""
    try:
        mtime = tmp.lstat().st_mtime
    except FileNotFoundError:
        return False
    m = _TMP_RE.search(tmp.name)
    if not m or m.group(2) != _host_tag():
        return time.time() - mtime > FOREIGN_STALE_S
    pid = int(m.group(1))
    if not _pid_alive(pid):
        return True
    started = _process_start_time(pid)
    if started is None:
        return False
    # btime has 1 s resolution: keep a margin so a live writer is never mistaken for stale.
    return mtime < started - 2.0


def _clean_stale_siblings(target: Path) -> list[Path]:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings left by crashed writers."""
    removed = []
    prefix_tmp, prefix_old = f".{target.name}.tmp-", f".{target.name}.old-"
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix_tmp) or entry.name.startswith(prefix_old)):
            continue
        p = Path(entry.path)
        if _is_stale(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE). Written by
    hand because the standard library has no atomic exchange: with it a reader sees either
    the old store or the new one, never a missing path. False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError, TypeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _looks_like_qsnet_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "schema_version" in (meta.get("attributes") or {})


def _same_files(new: Path, old: Path) -> bool:
    """Whether the store ``old`` holds exactly the files of ``new``, byte for byte."""
    if not old.is_dir() or old.is_symlink():
        return False
    try:
        names = sorted(str(p.relative_to(new)) for p in new.rglob("*") if p.is_file())
        if names != sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.is_file() or p.is_symlink()):
            return False
        return all((new / n).read_bytes() == (old / n).read_bytes() for n in names)
    except OSError:
        return False


def _swap_into_place(tmp: Path, target: Path) -> None:
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(tmp, target)
    else:
        if not (target.is_dir() and not target.is_symlink() and _looks_like_qsnet_store(target)):
            raise ValueError(f"{target}: exists and is not a qsnet store; refusing to replace it")
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous store
        else:
            # Portable fallback: move the old store aside, rename the new one in, delete
            # the old. A crash between the two renames leaves the path absent (never half a
            # store) and the old one under a ".old-" name that the next write removes.
            old = _temp_name(target, "old")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    _fsync_path(parent, directory=True)


def _array_metadata(data: np.ndarray, attrs: dict[str, Any], level: int) -> dict[str, Any]:
    """The zarr v3 array metadata of one store array: one chunk per axial slice, one shard
    for the whole array, zstd; keys in the order zarr 3.1 writes them (a test compares the
    files with zarr's own). Every chunk is written, even all-zero ones, so each array has a
    complete shard index and one file whatever its content."""
    dtype = np.dtype(data.dtype)
    chunk = [1] * (data.ndim - 2) + list(data.shape[-2:])
    data_type = "bool" if dtype.kind == "b" else _le_dtype(dtype).newbyteorder("=").name
    fill = False if dtype.kind == "b" else (0.0 if dtype.kind == "f" else 0)
    inner_bytes = {"name": "bytes", "configuration": {"endian": "little"}} if dtype.itemsize > 1 else {"name": "bytes"}
    return {
        "shape": list(data.shape),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(data.shape)}},
        # "c.0.0.0", not zarr's default "c/0/0/0": the shard is the array's only chunk, and
        # three folders per array cost a mkdir and an fsync each (a third of the store's
        # write time on the phantom's small arrays)
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": fill,
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": chunk,
                "codecs": [inner_bytes, {"name": "zstd", "configuration": {"level": level, "checksum": False}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            },
        }],
        "attributes": attrs,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _write_json(file: Path, doc: dict[str, Any]) -> None:
    # as zarr 3.1 writes zarr.json (json_indent 2)
    file.write_text(json.dumps(doc, allow_nan=True, indent=2))


def _write_array(root: Path, role: str, data: np.ndarray, attrs: dict[str, Any], level: int) -> None:
    """Write one array of the store rooted at ``root``: its zarr.json and its one shard file.

    zarr 3.1 spends ~1 ms of async machinery per chunk on a write (30 ms for a 30-slice
    array, more than compressing it) and ~3 ms creating each array; both files are simple
    enough to write directly. The shard is the zstd frames of the slices in C order, then
    the index of (offset, nbytes) uint64 pairs and its crc32c (zarr sharding spec, index at
    the end). Tests check the files against what zarr writes, and that zarr reads them."""
    (root / role).mkdir()
    _write_json(root / role / "zarr.json", _array_metadata(data, attrs, level))
    _write_shard(root / role / ".".join("c" + "0" * data.ndim), data, level)


def _write_shard(file: Path, data: np.ndarray, level: int) -> None:
    import google_crc32c
    from numcodecs import Zstd

    zstd = Zstd(level=level, checksum=False)
    le = np.ascontiguousarray(data, dtype=_le_dtype(data.dtype))
    slices = le.reshape(-1, *le.shape[-2:])
    index = np.empty((len(slices), 2), dtype="<u8")
    frames, offset = [], 0
    for i, sl in enumerate(slices):
        frame = zstd.encode(sl)
        index[i] = (offset, len(frame))
        offset += len(frame)
        frames.append(frame)
    body = index.tobytes()
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as fh:
        fh.writelines(frames)
        fh.write(body)
        fh.write(google_crc32c.value(body).to_bytes(4, "little"))


def write_exam_store(
    path: Path | str,
    arrays: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]],
    group_attrs: Mapping[str, Any],
    *,
    level: int = ZSTD_LEVEL,
) -> str:
    """Write one exam store atomically and return its content hash (for manifests).

    ``arrays`` maps a role name (``mrf_t1``, ``t1w``, ``labels``, ...) to ``(data, attrs)``,
    data ``(Z, Y, X)`` or ``(T, Z, Y, X)``. The array attrs get ``sha256`` (see
    :func:`voxel_sha256`) added; the group attrs get ``schema_version``. Attribute keys are
    sorted at every depth, so the same input gives byte-identical files.

    The store is written to ``.<name>.tmp-<pid>-<random>`` next to ``path``, fsynced, then
    swapped into place; an existing qsnet store at ``path`` is replaced, anything else there
    is an error. Stale temporary siblings of crashed writers are removed first.
    """
    path = Path(path)
    if path.suffix != ".zarr":
        raise ValueError(f"{path}: an exam store path must end in .zarr")
    if not arrays:
        raise ValueError(f"{path}: no arrays to write")

    prepared: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    for role in sorted(arrays):
        item = arrays[role]
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"array {role!r}: expected (data, attrs), got {type(item).__name__}")
        data, attrs = item
        data = _check_array(role, data)
        attrs = _canonical(attrs or {}, f"array {role!r}")
        digest = voxel_sha256(data)
        if "sha256" in attrs and attrs["sha256"] != digest:
            raise ValueError(f"array {role!r}: given sha256 {attrs['sha256']} does not match the voxels ({digest})")
        attrs["sha256"] = digest
        prepared[role] = (data, _canonical(attrs, f"array {role!r}"))

    gattrs = _canonical(group_attrs or {}, "group")
    if gattrs.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ValueError(f"group attrs: schema_version {gattrs['schema_version']!r} != {SCHEMA_VERSION}")
    gattrs["schema_version"] = SCHEMA_VERSION
    gattrs = _canonical(gattrs, "group")

    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_siblings(path)
    tmp = _temp_name(path, "tmp")
    try:
        tmp.mkdir()
        _write_json(tmp / "zarr.json", {"attributes": gattrs, "zarr_format": 3, "node_type": "group"})
        for role, (data, attrs) in prepared.items():
            _write_array(tmp, role, data, attrs, level)
        if _same_files(tmp, path):
            # made again (a new ingest version) and unchanged: the old files stay, byte for
            # byte and with their times, so nothing downstream sees a change
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _fsync_tree(tmp)
            _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _content_hash(gattrs, {r: (d.shape, d.dtype, a) for r, (d, a) in prepared.items()})


# --------------------------------------------------------------------------- fast slice reads


def _zstd_content_size(frame: bytes | memoryview) -> int | None:
    """Frame_Content_Size from a zstd frame header (RFC 8878 3.1.1.1), None when absent.
    Parsed by hand because numcodecs exposes no such call, and decoding straight into a
    preallocated array needs the size checked first (numcodecs accepts a larger buffer)."""
    if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame")
    fhd = frame[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    if len(frame) < pos + size:
        raise ValueError("truncated zstd frame header")
    value = int.from_bytes(bytes(frame[pos : pos + size]), "little")
    return value + 256 if size == 2 else value


class _ShardReader:
    """Slice reads from one array's shard file without zarr's machinery.

    Holds no file descriptor between calls (safe across fork, no fd exhaustion with many
    stores open); each read opens the file, checks it is the same file whose index is
    cached (device, inode, size, mtime) and reloads the index if not."""

    def __init__(
        self,
        file: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        fill_value: Any,
        index_location: str,
        index_nbytes: int,
    ) -> None:
        from numcodecs import Zstd

        self.file = file
        self.shape = shape
        self.dtype = np.dtype(dtype)  # native
        self.le_dtype = _le_dtype(self.dtype)
        self.fill_value = fill_value
        self.index_at_end = index_location == "end"
        self.index_nbytes = index_nbytes
        self.grid = shape[:-2]  # chunks per shard: one chunk per (t, z)
        self.slice_shape = shape[-2:]
        self.slice_nbytes = math.prod(self.slice_shape) * self.dtype.itemsize
        self._zstd = Zstd()
        self._ident: tuple[int, ...] | None = None
        self._index: np.ndarray | None = None

    @classmethod
    def for_array(cls, arr: zarr.Array, store_root: Path | None) -> _ShardReader | None:
        """A reader when ``arr`` uses exactly the layout :func:`write_exam_store` writes, else None."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation, ZstdCodec

        if store_root is None:
            return None
        md = arr.metadata
        if getattr(md, "zarr_format", None) != 3 or md.storage_transformers:
            return None
        shape = tuple(md.shape)
        if len(shape) not in (3, 4):
            return None
        try:
            dtype = np.dtype(arr.dtype)
        except TypeError:
            return None
        if dtype.kind not in "biuf":
            return None
        grid = md.chunk_grid
        if type(grid).__name__ != "RegularChunkGrid" or tuple(grid.chunk_shape) != shape:
            return None  # not one shard for the whole array
        if len(md.codecs) != 1 or not isinstance(md.codecs[0], ShardingCodec):
            return None
        sc = md.codecs[0]
        if tuple(sc.chunk_shape) != (1,) * (len(shape) - 2) + shape[-2:]:
            return None
        inner = sc.codecs
        if not (
            len(inner) == 2
            and isinstance(inner[0], BytesCodec)
            and (inner[0].endian is None or inner[0].endian.value == "little" or dtype.itemsize == 1)
            and isinstance(inner[1], ZstdCodec)
        ):
            return None
        idx = sc.index_codecs
        if not (
            len(idx) == 2
            and isinstance(idx[0], BytesCodec)
            and (idx[0].endian is not None and idx[0].endian.value == "little")
            and isinstance(idx[1], Crc32cCodec)
        ):
            return None
        try:
            key = md.encode_chunk_key((0,) * len(shape))
        except Exception:
            return None
        n_chunks = math.prod(shape[:-2])
        location = "end" if sc.index_location == ShardingCodecIndexLocation.end else "start"
        fill = md.fill_value
        return cls(store_root / arr.path / key, shape, dtype, fill, location, 16 * n_chunks + 4)

    def _load_index(self, fd: int, size: int) -> np.ndarray:
        import google_crc32c

        if size < self.index_nbytes:
            raise ValueError(f"{self.file}: shard file too short for its index ({size} bytes)")
        offset = size - self.index_nbytes if self.index_at_end else 0
        raw = os.pread(fd, self.index_nbytes, offset)
        if len(raw) != self.index_nbytes:
            raise ValueError(f"{self.file}: short read of the shard index")
        body, crc = raw[:-4], raw[-4:]
        if google_crc32c.value(body) != int.from_bytes(crc, "little"):
            raise ValueError(f"{self.file}: shard index checksum mismatch (corrupt file)")
        index = np.frombuffer(body, dtype="<u8").reshape(self.grid + (2,)).astype(np.uint64)
        present = index[..., 0] != _MAX_U64
        if np.any(index[..., 0][present] + index[..., 1][present] > size):
            raise ValueError(f"{self.file}: shard index points past the end of the file")
        return index

    def _decode_into(self, fd: int, index: np.ndarray, coord: tuple[int, ...], out: np.ndarray) -> None:
        off, nbytes = index[coord]
        if off == _MAX_U64:  # chunk never written: zarr reads it as the fill value
            out[...] = self.fill_value
            return
        buf = os.pread(fd, int(nbytes), int(off))
        if len(buf) != nbytes:
            raise ValueError(f"{self.file}: short read of chunk {coord}")
        if _zstd_content_size(buf) != self.slice_nbytes:
            raise ValueError(f"{self.file}: chunk {coord} does not decode to {self.slice_nbytes} bytes")
        try:
            if out.dtype == self.le_dtype:
                self._zstd.decode(buf, out=out)
            else:  # big-endian host
                tmp = np.empty(out.shape, dtype=self.le_dtype)
                self._zstd.decode(buf, out=tmp)
                out[...] = tmp
        except RuntimeError as exc:  # numcodecs' zstd: "Zstd decompression error: ..."
            raise ValueError(f"{self.file}: chunk {coord} cannot be decoded ({exc}): a corrupt file") from None

    def _open(self) -> tuple[int, np.ndarray]:
        fd = os.open(self.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            index = self._index
            if index is None or ident != self._ident:
                index = self._load_index(fd, st.st_size)
                self._index, self._ident = index, ident
            return fd, index
        except BaseException:
            os.close(fd)
            raise

    def slice(self, z: int, t: int | None) -> np.ndarray:
        fd, index = self._open()
        try:
            if len(self.grid) == 1:
                out = np.empty(self.slice_shape, dtype=self.dtype)
                self._decode_into(fd, index, (z,), out)
            elif t is not None:
                out = np.empty(self.slice_shape, dtype=self.dtype)
                self._decode_into(fd, index, (t, z), out)
            else:
                out = np.empty((self.grid[0],) + self.slice_shape, dtype=self.dtype)
                for ti in range(self.grid[0]):
                    self._decode_into(fd, index, (ti, z), out[ti])
            return out
        finally:
            os.close(fd)

    def read(self) -> np.ndarray:
        fd, index = self._open()
        try:
            out = np.empty(self.shape, dtype=self.dtype)
            for coord in np.ndindex(*self.grid):
                self._decode_into(fd, index, coord, out[coord])
            return out
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- reading


def _norm_index(i: Any, n: int, axis: str, role: str) -> int:
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"{role}: {axis} index must be an integer, got {type(i).__name__}")
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"{role}: {axis} index {i} out of range for size {n}")
    return i + n if i < 0 else i


class MissingDataError(FileNotFoundError):
    """An array whose voxels the store records (their ``sha256``, which :func:`write_exam_store`
    writes with the data file) without its data file: an incomplete copy (a pull or a sync that
    stopped, a file deleted), never an empty array. zarr would read it as the fill value, a
    blank that looks like data to training and evaluation."""


class ExamStore:
    """A read-only view of one exam store. Only metadata is read when it is opened."""

    def __init__(self, location: Path | str, group: zarr.Group, store_root: Path | None) -> None:
        self.path = location
        self._group = group
        self._root = store_root
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._arrays: dict[str, zarr.Array] = {name: a for name, a in group.arrays()}
        self.roles: list[str] = sorted(self._arrays)
        self._readers: dict[str, _ShardReader | None] = {}

    def __repr__(self) -> str:
        return f"ExamStore({str(self.path)!r}, roles={self.roles})"

    def __contains__(self, role: object) -> bool:
        return role in self._arrays

    def __reduce__(self) -> tuple[Any, ...]:  # pickles as its location (Ray tasks, DataLoader workers)
        return (open_store, (self.path,))

    def array(self, role: str) -> zarr.Array:
        """The zarr array (lazy: indexing reads only the chunks it needs)."""
        try:
            return self._arrays[role]
        except KeyError:
            raise KeyError(f"{self.path}: no array {role!r} (has {', '.join(self.roles)})") from None

    def attrs_of(self, role: str) -> dict[str, Any]:
        return dict(self.array(role).attrs)

    def _reader(self, role: str) -> _ShardReader | None:
        if role not in self._readers:
            self._readers[role] = _ShardReader.for_array(self.array(role), self._root)
        return self._readers[role]

    def slice(self, role: str, z: int, t: int | None = None) -> np.ndarray:
        """Axial slice ``z``: ``(Y, X)`` for a 3-D array; for a 4-D ``(T, Z, Y, X)`` array
        ``(T, Y, X)`` (all of axis 0), or ``(Y, X)`` when ``t`` is given. Same values as
        ``array(role)[z]`` / ``[:, z]`` / ``[t, z]``, a fresh writable array."""
        arr = self.array(role)
        shape = arr.shape
        z = _norm_index(z, shape[-3], "z", role)
        if len(shape) == 3:
            if t is not None:
                raise TypeError(f"{role}: t given for a 3-D array")
        else:
            t = None if t is None else _norm_index(t, shape[0], "t", role)
        reader = self._reader(role)
        if reader is not None:
            try:
                return reader.slice(z, t)
            except FileNotFoundError:
                self._no_data_file(reader, role)
        if len(shape) == 3:
            return np.asarray(arr[z])
        return np.asarray(arr[:, z] if t is None else arr[t, z])

    def has_data(self, role: str) -> bool:
        """Whether any of ``role``'s chunks is stored. False on a store of ours is a damaged one
        (its reads raise :class:`MissingDataError`); for another writer's array without a shard,
        zarr reads the fill value."""
        reader = self._reader(role)
        if reader is not None:
            return reader.file.exists()
        return self.array(role).nchunks_initialized > 0

    def read(self, role: str) -> np.ndarray:
        """The whole array."""
        reader = self._reader(role)
        if reader is not None:
            try:
                return reader.read()
            except FileNotFoundError:
                self._no_data_file(reader, role)
        return np.asarray(self.array(role)[...])

    def _no_data_file(self, reader: _ShardReader, role: str) -> None:
        """MissingDataError for an array of ours without its data file; for another writer's
        array without a shard (all chunks empty), zarr reads the fill value."""
        if "sha256" in self.attrs_of(role) and not reader.file.exists():
            raise MissingDataError(f"{reader.file}: the data file of {role!r} is missing (an incomplete "
                                   "copy or pull?): `dvc pull` or ingest again") from None

    def verify(self, roles: list[str] | None = None) -> None:
        """Re-hash the voxels of ``roles`` (default all) against their ``sha256`` attribute."""
        for role in roles or self.roles:
            want = self.attrs_of(role).get("sha256")
            got = voxel_sha256(self.read(role))
            if want != got:
                raise ValueError(f"{self.path}: array {role!r}: voxel sha256 {got} != recorded {want}")

    def content_hash(self) -> str:
        """The hash :func:`write_exam_store` returned, from metadata alone."""
        return _content_hash(
            self.attrs,
            {r: (tuple(a.shape), np.dtype(a.dtype), dict(a.attrs)) for r, a in self._arrays.items()},
        )


def open_store(path: Path | str) -> ExamStore:
    """Open an exam store for reading: a local directory, or an fsspec URL (``s3://...``,
    read through zarr only). Raises :class:`NotAStoreError` (a ``ValueError``) for anything
    that is not a qsnet store of this schema version."""
    import zarr  # here, not at the top: writing a store needs none of it

    remote = isinstance(path, str) and "://" in path and not path.startswith("file://")
    if remote:
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
        except Exception as exc:
            raise NotAStoreError(path, f"cannot open as a Zarr v3 group: {exc}") from None
        _check_group_attrs(path, dict(group.attrs))
        return ExamStore(path, group, None)

    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://") :]
    path = Path(path)
    if not path.exists():
        raise NotAStoreError(path, "does not exist")
    if not path.is_dir():
        raise NotAStoreError(path, "not a directory")
    meta_file = path / "zarr.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise NotAStoreError(path, "no zarr.json: not a Zarr v3 store") from None
    except (OSError, ValueError) as exc:
        raise NotAStoreError(path, f"unreadable zarr.json: {exc}") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise NotAStoreError(path, "zarr.json is not a Zarr v3 group")
    _check_group_attrs(path, meta.get("attributes") or {})
    group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r", zarr_format=3)
    return ExamStore(path, group, path)


def _check_group_attrs(path: Any, attrs: Mapping[str, Any]) -> None:
    if "schema_version" not in attrs:
        raise NotAStoreError(path, "no schema_version attribute")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise NotAStoreError(path, f"schema_version {attrs['schema_version']!r}, this code reads {SCHEMA_VERSION}")
