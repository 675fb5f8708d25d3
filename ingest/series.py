"""Finding DICOM files in a tree and grouping them into series.

:func:`scan` walks a folder tree and reads the header of every file (pixel data is
never read: ``pydicom.dcmread(stop_before_pixels=True)``, also for a bare data set without
the preamble), returning one small, picklable :class:`FileInfo` per DICOM image file and
``(path, reason)`` for every file that cannot be ingested (empty, not DICOM, truncated, not
an image, a symlink loop...).

:func:`group_series` groups those files into series the way dcm2niix does: by
(SeriesInstanceUID, SeriesNumber) - several vendors' exports reuse one
SeriesInstanceUID for series with different numbers (see the dcm_qa_ts test data) -
and then splits a group whose files cannot form one image volume (different
orientation, matrix, pixel spacing, echo, image type, or single-frame mixed with
multi-frame exports of the same acquisition), and an enhanced object whose frames are of
several kinds (FrameType) into one series per kind.  Every part of a split group gets a
suffix in its key (``_e2`` for echo 2, ``_part2`` for the second geometry, ``_FIELD_MAP``
for the field-map frames of a B0 map...).

Nothing here stores identifying header fields: a FileInfo holds UIDs (needed to
group), geometry and acquisition parameters only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ingest.dicomlite import enabled as dicomlite_enabled
from ingest.dicomlite import read_lite
from ingest.reader import (  # one parser for DICOM numbers
    ReadPlan,
    _f,
    _find,
    _i,
    acquisition_fields,
    colour_model,
    complex_component,
    dcmread_any,
    enhanced_frame_type,
    ge_pepolar_reversed,
    looks_like_dicom,
    read_plan,
)

__all__ = ["FileInfo", "SeriesGroup", "scan", "group_series", "is_image_sop_class"]


@dataclass(frozen=True)
class FileInfo:
    """Header summary of one DICOM image file (no identifying fields)."""

    path: Path
    size: int
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    series_number: int | None
    study_uid: str
    modality: str = ""
    manufacturer: str = ""
    model: str = ""
    echo_number: int | None = None
    orientation: tuple[float, ...] | None = None      # 6 direction cosines (row, column)
    position: tuple[float, ...] | None = None         # ImagePositionPatient (first frame)
    pixel_spacing: tuple[float, ...] | None = None    # (row spacing, column spacing) mm
    rows: int | None = None
    columns: int | None = None
    transfer_syntax: str = ""
    image_type: tuple[str, ...] = ()
    description: str = ""
    protocol: str = ""
    sequence_name: str = ""
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    flip_angle: float | None = None
    n_frames: int = 1
    enhanced: bool = False                            # geometry in functional groups
    frame_types: tuple[str, ...] = ()                 # enhanced: the FrameTypes of its frames, sorted
    complex_component: str = ""                       # classic: MAGNITUDE, PHASE, REAL, IMAGINARY or FIELD_MAP, if stated
    rows_reversed: bool = False                       # classic: a reversed-polarity GE epi_pepolar image
    colour: str = ""                                  # "" greyscale, else the PhotometricInterpretation
    acquisition_number: int | None = None
    instance_number: int | None = None
    # what the reader needs to read a plain classic file without parsing it again, and the
    # sha256 of the bytes that plan was taken from (valid together, see plan_is_current)
    plan: ReadPlan | None = field(default=None, compare=False, repr=False)
    sha256: str = field(default="", compare=False, repr=False)
    # whose image this is, for grouping files into exams only (two patients under one study UID
    # are two exams); never printed (out of repr) and never stored
    patient_id: str = field(default="", compare=False, repr=False)


@dataclass
class SeriesGroup:
    """Files of one series (one image volume or one multi-volume series)."""

    key: str
    files: list[Path]
    series_uid: str = ""
    series_number: int | None = None
    study_uid: str = ""
    description: str = ""
    protocol: str = ""
    sequence_name: str = ""
    image_type: list[str] = field(default_factory=list)
    frame_type: str = ""                                # one kind of an enhanced object's frames
    complex_component: str = ""                         # classic: see FileInfo
    colour: str = ""                                    # see FileInfo
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    flip_angle: float | None = None
    manufacturer: str = ""
    model: str = ""
    modality: str = ""
    echo_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    orientation: tuple[float, ...] | None = None
    n_frames: int = 0                                  # sum over its files


# ----------------------------------------------------------------------------- helpers

# MR, enhanced MR, legacy converted enhanced MR and secondary capture images: known without
# pydicom's UID dictionary, whose import (0.15 s, pixel handlers included) a scan of plain
# classic files never needs otherwise
_MR_IMAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",
                               "1.2.840.10008.5.1.4.1.1.4.4", "1.2.840.10008.5.1.4.1.1.7"})


@lru_cache(maxsize=256)
def sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


@lru_cache(maxsize=256)
def is_image_sop_class(uid: str) -> bool:
    """True for SOP classes that carry pixel data we could read (image storage, maps)."""
    if uid in _MR_IMAGE_CLASSES:
        return True
    # cached: pydicom validates the UID on every construction, and a tree has a handful of classes
    name = sop_class_name(uid) if uid else ""
    if not name or name == uid:  # unknown / private SOP class: let the reader decide
        return True
    return "Image Storage" in name or "Parametric Map" in name


def _s(ds, kw: str) -> str:
    v = ds.get(kw)
    if v is None:
        return ""
    return str(v).strip()


def _floats(v, n: int) -> tuple[float, ...] | None:
    if v is None:
        return None
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def find_attr(ds, keyword: str, frame: int = 0):
    """A header value, from the top level or else the functional groups of one frame
    (enhanced multi-frame objects keep geometry one sequence deeper, PS3.3 C.7.6.16)."""
    return _find(ds, keyword, frame)


def _frame_types(ds) -> tuple[str, ...]:
    return tuple(sorted({enhanced_frame_type(ds, i) for i in range(_i(ds.get("NumberOfFrames")) or 1)}))


def _colour(ds) -> str:
    """The colour model of a file, "" for greyscale and for a layout the standard does not have
    (three samples called MONOCHROME2): the reader refuses that one with its own reason."""
    return colour_model(ds) or ""


def header_summary(ds, path: Path, size: int, plan: ReadPlan | None = None, sha256: str = "") -> FileInfo:
    """FileInfo from a (header-only) dataset."""
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    sop_class = _s(ds, "SOPClassUID") or (str(meta.get("MediaStorageSOPClassUID", "")) if meta else "")
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    itypes, seq, te, ti = acquisition_fields(ds)
    image_type = tuple(itypes)
    return FileInfo(
        path=path,
        size=size,
        patient_id=_s(ds, "PatientID"),
        sop_instance_uid=_s(ds, "SOPInstanceUID"),
        sop_class_uid=sop_class,
        series_uid=_s(ds, "SeriesInstanceUID"),
        series_number=_i(ds.get("SeriesNumber")),
        study_uid=_s(ds, "StudyInstanceUID"),
        modality=_s(ds, "Modality"),
        manufacturer=_s(ds, "Manufacturer"),
        model=_s(ds, "ManufacturerModelName"),
        echo_number=_i(ds.get("EchoNumbers")),
        orientation=_floats(find_attr(ds, "ImageOrientationPatient"), 6),
        position=_floats(find_attr(ds, "ImagePositionPatient"), 3),
        pixel_spacing=_floats(find_attr(ds, "PixelSpacing"), 2),
        rows=_i(ds.get("Rows")),
        columns=_i(ds.get("Columns")),
        transfer_syntax=ts,
        image_type=image_type,
        description=_s(ds, "SeriesDescription"),
        protocol=_s(ds, "ProtocolName"),
        sequence_name=seq,
        tr=_f(find_attr(ds, "RepetitionTime")),
        te=te,
        ti=ti,
        flip_angle=_f(find_attr(ds, "FlipAngle")),
        n_frames=_i(ds.get("NumberOfFrames")) or 1,
        enhanced=enhanced,
        frame_types=_frame_types(ds) if enhanced else (),
        complex_component="" if enhanced else (plan.component if plan is not None else complex_component(ds)),
        rows_reversed=False if enhanced else (plan.rows_reversed if plan is not None else ge_pepolar_reversed(ds)),
        colour=_colour(ds),
        acquisition_number=_i(ds.get("AcquisitionNumber")),
        instance_number=_i(ds.get("InstanceNumber")),
        plan=plan,
        sha256=sha256,
    )


_WHOLE_FILE_MAX = 64 << 20  # larger files are left to pydicom, which reads the header only

_NOT_DICOM = "not DICOM (no 'DICM' signature after the 128-byte preamble)"
_NOT_IMAGE = "not an image ("


def benign_problem(reason: str) -> bool:
    """Whether a problem :func:`scan` reports is a file that is no DICOM image at all (a README,
    a DICOMDIR, a structured report), not ours to read; any other problem is a file that is, or
    claims to be, a DICOM image that could not be read, and a slice of a series may be in it."""
    return reason == _NOT_DICOM or reason.startswith(_NOT_IMAGE)
# uncompressed, not deflated: the file size alone tells whether the pixel data is complete
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_DEFLATED = "1.2.840.10008.1.2.1.99"


def _native_pixel_bytes(ds) -> int | None:
    """Bytes of uncompressed pixel data the header promises (None if it cannot tell)."""
    rows, cols = _i(ds.get("Rows")), _i(ds.get("Columns"))
    bits = _i(ds.get("BitsAllocated"))
    if not rows or not cols or not bits:
        return None
    spp = _i(ds.get("SamplesPerPixel")) or 1
    frames = _i(ds.get("NumberOfFrames")) or 1
    n = rows * cols * frames * spp
    if spp == 3 and _s(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        n = rows * cols * frames * 2  # Cb and Cr sampled at every other column (PS3.3 C.7.6.3.1.2)
    return (n + 7) // 8 if bits == 1 else n * (bits // 8)


def _lite_summary(ds, path: Path, size: int, mtime_ns: int | None, buf: bytes) -> tuple[FileInfo | None, str]:
    sop_class = _s(ds, "SOPClassUID") or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if not is_image_sop_class(sop_class):
        return None, f"{_NOT_IMAGE}{sop_class_name(sop_class)}): ingest reads image storage classes only"
    if not _s(ds, "SeriesInstanceUID"):
        return None, "DICOM file without SeriesInstanceUID: cannot tell which series it belongs to"
    plan = read_plan(ds, path, size, mtime_ns) if mtime_ns is not None else None
    sha = hashlib.sha256(buf).hexdigest() if plan is not None else ""
    return header_summary(ds, path, size, plan, sha), ""


def _may_be_dicom(path: Path, buf: bytes | None) -> bool:
    try:
        return looks_like_dicom(path, buf)
    except OSError:
        return True  # pydicom says why


def _read_header(path: Path, size: int, mtime_ns: int | None = None) -> tuple[FileInfo | None, str]:
    """(FileInfo, "") for a DICOM image file, else (None, reason). With ``mtime_ns``, a
    plain classic file's FileInfo carries its read plan (see :class:`ingest.reader.ReadPlan`)."""
    if size == 0:
        return None, "empty file (0 bytes): incomplete copy?"
    buf = None
    if size <= _WHOLE_FILE_MAX and dicomlite_enabled():
        try:  # read once: parsed here, and hashed here for the manifest
            with open(path, "rb") as fh:
                buf = fh.read()
        except OSError:
            buf = None  # pydicom below says why
    ds = read_lite(path, buf=buf) if buf is not None else None
    if ds is not None:  # a healthy classic file (complete pixel data): the fast path
        try:
            return _lite_summary(ds, path, size, mtime_ns, buf)
        except Exception:  # noqa: BLE001 - a case the fast path misjudged: pydicom reads it below
            pass
    elif not _may_be_dicom(path, buf):
        # what dcmread_any would say, without importing pydicom for the README beside the exams
        return None, _NOT_DICOM
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            ds = dcmread_any(fh, stop_before_pixels=True)
            end = fh.tell()
    except InvalidDicomError:
        return None, _NOT_DICOM
    except PermissionError as exc:
        return None, f"cannot read file: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 - any parse failure is a property of the file
        return None, f"unreadable DICOM header ({exc.__class__.__name__}: {exc}): truncated or corrupt file?"
    meta = getattr(ds, "file_meta", None)
    sop_class = _s(ds, "SOPClassUID") or (str(meta.get("MediaStorageSOPClassUID", "")) if meta else "")
    if not is_image_sop_class(sop_class):
        return None, f"{_NOT_IMAGE}{sop_class_name(sop_class)}): ingest reads image storage classes only"
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts == _DEFLATED:
        # pydicom inflates a deflated data set whole, so the file position tells nothing about
        # where its pixel data is: look for the element in the inflated data set instead
        try:
            with open(path, "rb") as fh:
                full = dcmread_any(fh)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a property of the file
            return None, f"unreadable deflated DICOM ({exc.__class__.__name__}: {exc}): truncated or corrupt file?"
        if not any(k in full for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            return None, "no pixel data: the deflated data set holds no Pixel Data element"
        end = -1
    at_eof = end >= size
    if at_eof:
        # pydicom stops quietly at the end of a file: an image whose header read ran
        # into the end of the file never reached its Pixel Data element.
        if "Rows" not in ds or not _s(ds, "SeriesInstanceUID"):
            # a full-size file whose header has one damaged element length reads the same way
            return None, (f"truncated or damaged DICOM header: reading it runs past the end of the file "
                          f"({size} bytes) before the image attributes and the pixel data: an incomplete "
                          "copy, or an element length damaged in the header")
        return None, f"no pixel data: the file ends after {size} bytes, before any Pixel Data element"
    if not _s(ds, "SeriesInstanceUID"):
        return None, "DICOM file without SeriesInstanceUID: cannot tell which series it belongs to"
    if "Rows" not in ds or "Columns" not in ds:
        return None, "DICOM file without Rows/Columns: not an image"
    if ts in _NATIVE_SYNTAXES:
        need = _native_pixel_bytes(ds)
        # `end` is the start of the Pixel Data element (its 8-12 byte element header follows)
        have = max(size - end - 8, 0)  # bytes after the header, less a short element header
        if need is not None and have < need:
            if need >= 2 * have + 64:
                return None, (
                    f"Rows x Columns ({_i(ds.get('Rows'))} x {_i(ds.get('Columns'))}) x frames x bytes = "
                    f"{need} bytes, far more than the {have} bytes of pixel data in the file: header and "
                    "pixel data disagree (corrupt or edited header)")
            return None, (f"pixel data truncated: the file has {have} bytes after its header, "
                          f"Rows x Columns x frames x bytes needs {need} (incomplete copy?)")
    return header_summary(ds, path, size), ""


# ------------------------------------------------------------------------------- scan

def scan(root, jobs: int = 1, pool=None) -> tuple[list[FileInfo], list[tuple[Path, str]]]:
    """Walk ``root``; header summaries of DICOM image files, and (path, reason) for the rest.

    Symlinked folders are followed once: a link to a folder that is one of its own
    ancestors (a loop) or that was already scanned through another path is reported
    as a problem and not entered.  Broken links and unreadable folders are problems
    too.  Paths are returned as found under ``root`` (not resolved): real folders first, in
    name order, then what linked folders add.
    Header reads dominate on trees of many small files: ``jobs`` > 1 spreads them over
    processes (the walk itself stays in this process, so loop detection is unchanged).
    """
    root = Path(root)
    infos: list[FileInfo] = []
    problems: list[tuple[Path, str]] = []
    if root.is_file():
        files = [root]
        _scan_files(files, infos, problems)
        return infos, problems
    if not root.is_dir():
        return infos, [(root, "does not exist or is not a folder")]

    visited: dict[str, Path] = {}
    real_root = os.path.realpath(root)

    def shown(path) -> str:
        # Paths inside the tree relative to it, as the manifest's rows name them: the absolute
        # path above it (a mount named after a patient, a user's home) is not ours to log.
        for base in (str(root), real_root):
            rel = os.path.relpath(path, base)
            if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
                return rel
        return "a path outside the input tree"

    def broken(p: Path, exc: OSError) -> str:
        if exc.errno != errno.ENOENT:
            return f"broken symlink: {exc.strerror or exc}"
        # the kernel resolves a relative target from the link's real folder, not the walked path
        target = os.path.normpath(os.path.join(os.path.realpath(p.parent), os.readlink(p)))
        return f"broken symlink: its target {shown(target)} does not exist"

    # Linked folders wait until every real folder is walked, so files are found under their
    # own paths and a link to a folder already seen is the one reported.
    linked: list[tuple[Path, tuple[str, ...]]] = []

    def walk(folder: Path, ancestors: tuple[str, ...]) -> None:
        real = os.path.realpath(folder)
        if real in ancestors:
            problems.append((folder, f"symlink loop: points back to its ancestor {shown(real)}; not followed"))
            return
        if real in visited:
            problems.append((folder, f"link to a folder already scanned as {shown(visited[real])}; "
                                     "not followed twice"))
            return
        visited[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append((folder, f"cannot list folder: {exc.strerror or exc}"))
            return
        subdirs, files = [], []
        for e in entries:
            p = folder / e.name
            try:
                st = os.stat(p)  # follows links
            except OSError as exc:
                problems.append((p, broken(p, exc) if e.is_symlink() else "cannot stat file"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if e.is_symlink():
                    linked.append((p, ancestors + (real,)))
                else:
                    subdirs.append(p)
            elif stat.S_ISREG(st.st_mode):
                files.append(p)
            else:
                problems.append((p, "not a regular file (device, socket or pipe)"))
        found.extend(files)
        for d in subdirs:
            walk(d, ancestors + (real,))

    found: list[Path] = []
    walk(root, ())
    while linked:
        walk(*linked.pop(0))
    if (jobs > 1 or pool is not None) and len(found) > 256:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [found[i:i + 128] for i in range(0, len(found), 128)]
        own = pool is None
        pool = ProcessPoolExecutor(max_workers=jobs) if own else pool
        try:
            for ch_infos, ch_problems in pool.map(_scan_chunk, chunks):
                infos.extend(ch_infos)
                problems.extend(ch_problems)
        finally:
            if own:
                pool.shutdown()
    else:
        _scan_files(found, infos, problems)
    return infos, problems


def _scan_chunk(files: list[Path]) -> tuple[list[FileInfo], list[tuple[Path, str]]]:
    infos: list[FileInfo] = []
    problems: list[tuple[Path, str]] = []
    _scan_files(files, infos, problems)
    return infos, problems


def _scan_files(files: list[Path], infos: list, problems: list) -> None:
    for p in files:
        try:
            st = os.stat(p)
        except OSError as exc:
            problems.append((p, f"cannot stat file: {exc.strerror or exc}"))
            continue
        try:
            info, reason = _read_header(p, st.st_size, st.st_mtime_ns)
        except Exception as exc:  # noqa: BLE001 - one file the header code cannot handle must not stop the scan
            info, reason = None, f"unreadable DICOM header ({exc.__class__.__name__}: {exc})"
        if info is None:
            problems.append((p, " ".join(x.strip() for x in reason.splitlines() if x.strip())))
        else:
            infos.append(info)


# ----------------------------------------------------------------------- group_series

def _split_signature(fi: FileInfo) -> tuple:
    """What must agree inside one volume (besides echo): see group_series."""
    return (
        fi.orientation,
        (fi.rows, fi.columns),
        fi.pixel_spacing,
        fi.n_frames > 1 or fi.enhanced,            # classic vs enhanced export of one series
        tuple(t.upper() for t in fi.image_type),
        fi.complex_component,                      # GE keeps all four under one ImageType
        fi.rows_reversed,                          # GE epi_pepolar: both polarities in one series
        fi.colour,                                 # a colour copy filed under the series' UID
    )


def _close(a, b, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def _same_part(a: tuple, b: tuple) -> bool:
    return (_close(a[0], b[0], 1e-3) and a[1] == b[1] and _close(a[2], b[2], 1e-3)
            and a[3] == b[3] and a[4] == b[4] and a[5] == b[5] and a[6] == b[6] and a[7] == b[7])


def part_difference(a: FileInfo, b: FileInfo) -> str:
    """What sets two parts of one series apart (the fields :func:`group_series` splits on, and
    SeriesNumber), in words for a manifest reason; "" if nothing does."""
    sa, sb = _split_signature(a), _split_signature(b)
    out = []
    if not _close(sa[0], sb[0], 1e-3):
        out.append("ImageOrientationPatient")
    if sa[1] != sb[1]:
        out.append(f"Rows x Columns ({a.rows} x {a.columns} vs {b.rows} x {b.columns})")
    if not _close(sa[2], sb[2], 1e-3):
        out.append(f"PixelSpacing ({_fmt(a.pixel_spacing)} vs {_fmt(b.pixel_spacing)})")
    if sa[3] != sb[3]:
        out.append("single-frame vs multi-frame storage")
    if sa[4] != sb[4]:
        out.append(f"ImageType ({_fmt(a.image_type)} vs {_fmt(b.image_type)})")
    if sa[5] != sb[5]:
        out.append(f"complex component ({a.complex_component or 'unstated'} vs {b.complex_component or 'unstated'})")
    if sa[6] != sb[6]:
        out.append("phase-encoding polarity (GE epi_pepolar)")
    if sa[7] != sb[7]:
        out.append(f"colour ({a.colour or 'greyscale'} vs {b.colour or 'greyscale'})")
    if a.series_number != b.series_number:
        out.append(f"SeriesNumber ({_fmt(a.series_number)} vs {_fmt(b.series_number)})")
    return ", ".join(out)


def _fmt(v) -> str:
    if v is None:
        return "absent"
    if isinstance(v, (tuple, list)):
        return "\\".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return str(v)


def group_series(files: list[FileInfo]) -> tuple[list[SeriesGroup], list[tuple[Path, str]]]:
    """Group FileInfos into series; (path, reason) for duplicates.

    1. group by (SeriesInstanceUID, SeriesNumber), as dcm2niix does;
    2. within a group, a repeated SOPInstanceUID keeps the first file (sorted path
       order) and reports the others: ``(path, "duplicate SOP instance <uid> of <first>")``;
    3. split a group by EchoNumbers when it holds several echoes (key suffix
       ``_e<n>``; classic slices without EchoNumbers by echo time, ``n`` its rank;
       enhanced exports get no echo suffix), then by what must agree inside one volume: orientation (1e-3),
       Rows/Columns, pixel spacing (1e-3 mm), image type, complex component (magnitude,
       phase, real, imaginary: :func:`ingest.reader.complex_component`), phase-encoding
       polarity of GE epi_pepolar volumes, and single-frame vs
       multi-frame storage (suffix ``_part<k>``, k = 1, 2, ... in sorted-path order
       of each part's first file).  An unsplit group's key is
       ``<SeriesNumber>_<SeriesInstanceUID>`` (contains UIDs: pseudonymise it
       before it leaves ingest).
    Groups are returned sorted by (series number, key).
    """
    by_series: dict[tuple[str, int | None], list[FileInfo]] = {}
    for fi in files:
        by_series.setdefault((fi.series_uid, fi.series_number), []).append(fi)

    problems: list[tuple[Path, str]] = []
    groups: list[SeriesGroup] = []
    for (uid, number), members in by_series.items():
        members = sorted(members, key=lambda f: str(f.path))
        seen: dict[str, Path] = {}
        unique: list[FileInfo] = []
        for fi in members:
            sop = fi.sop_instance_uid
            if sop and sop in seen:
                problems.append((fi.path, f"duplicate SOP instance {sop} of {seen[sop]}"))
                continue
            if sop:
                seen[sop] = fi.path
            unique.append(fi)
        base = f"{number if number is not None else 'x'}_{uid}"

        by_echo: dict[int | None, list[FileInfo]] = {}
        for fi in unique:
            by_echo.setdefault(fi.echo_number, []).append(fi)
        # EchoNumbers is optional (type 3): classic slices without it whose echo times differ
        # are echoes too, numbered by echo time as dcm2niix does, not volumes of one series
        plain = by_echo.get(None, [])
        if list(by_echo) == [None] and all(fi.te is not None and fi.n_frames == 1 and not fi.enhanced for fi in plain):
            tes = sorted({round(fi.te, 2) for fi in plain})
            if len(tes) > 1:
                by_echo = {}
                for fi in plain:
                    by_echo.setdefault(tes.index(round(fi.te, 2)) + 1, []).append(fi)
        n_echoes = len([e for e in by_echo if e is not None])
        named: dict[str, tuple[int | None, list[list[FileInfo]]]] = {}
        for echo in sorted(by_echo, key=lambda e: (e is None, e or 0)):
            # an echo suffix only when the series really has several echoes; files
            # without EchoNumbers (enhanced exports) go with the unsuffixed parts
            ekey = base + (f"_e{echo}" if n_echoes > 1 and echo is not None else "")
            parts: list[tuple[tuple, list[FileInfo]]] = []  # in order of each part's first file
            for fi in by_echo[echo]:
                sig = _split_signature(fi)
                for psig, pfiles in parts:
                    if _same_part(psig, sig):
                        pfiles.append(fi)
                        break
                else:
                    parts.append((sig, [fi]))
            named.setdefault(ekey, (echo, []))[1].extend(pfiles for _, pfiles in parts)
        for ekey, (echo, plist) in named.items():
            for k, pfiles in enumerate(plist, start=1):
                key = ekey + (f"_part{k}" if len(plist) > 1 else "")
                kinds = sorted({t for fi in pfiles for t in fi.frame_types})
                if len(kinds) < 2:
                    groups.append(_make_group(key, pfiles, echo=echo))
                    continue
                # a Philips B0 map keeps magnitude and field-map frames in one object: one
                # series per kind, as dcm2niix writes them, never one 4-D stack of both
                for kind in kinds:
                    groups.append(_make_group(f"{key}_{_kind_label(kind, kinds)}",
                                              [fi for fi in pfiles if kind in fi.frame_types], kind, echo))
    groups.sort(key=lambda g: (g.series_number if g.series_number is not None else -1, g.key))
    return groups, problems


def _kind_label(kind: str, kinds: list[str]) -> str:
    """The FrameType values that tell ``kind`` from the others (``FIELD_MAP``, ``M``)."""
    split = [k.split("\\") for k in kinds]
    width = max(len(v) for v in split)
    mine = kind.split("\\")
    own = [mine[i] for i in range(len(mine))
           if len({v[i] if i < len(v) else "" for v in split}) > 1 or width == 1] or mine
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in "-".join(own)) or "none"


def _make_group(key: str, files: list[FileInfo], frame_type: str = "", echo: int | None = None) -> SeriesGroup:
    f0 = files[0]
    return SeriesGroup(
        key=key,
        files=sorted(f.path for f in files),
        series_uid=f0.series_uid,
        series_number=f0.series_number,
        study_uid=f0.study_uid,
        description=f0.description,
        protocol=f0.protocol,
        sequence_name=f0.sequence_name,
        image_type=frame_type.split("\\") if frame_type else list(f0.image_type),
        frame_type=frame_type,
        complex_component=f0.complex_component,
        colour=f0.colour,
        tr=f0.tr,
        te=f0.te,
        ti=f0.ti,
        flip_angle=f0.flip_angle,
        manufacturer=f0.manufacturer,
        model=f0.model,
        modality=f0.modality,
        # the echo this group is (by EchoNumbers, or by rank of echo time where the header has none)
        echo_number=echo if echo is not None else f0.echo_number,
        rows=f0.rows,
        columns=f0.columns,
        orientation=f0.orientation,
        n_frames=sum(f.n_frames for f in files),
    )
