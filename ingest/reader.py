"""Reading one DICOM series into an array and its LPS affine.

``read_series(paths)`` takes the files of ONE series (see :mod:`ingest.series` for
finding and grouping them) and returns ``(array, affine_lps, meta)``:

* ``array``: float32 after RescaleSlope/RescaleIntercept, ``(Z, Y, X)``, or
  ``(T, Z, Y, X)`` for a multi-volume series (fMRI, diffusion, ASL...), volumes in
  acquisition order;
* ``affine_lps``: 4x4, maps the voxel index ``(z, y, x)`` to DICOM patient LPS mm:
  column 2 = row cosine * column spacing (PixelSpacing[1]), column 1 = column
  cosine * row spacing (PixelSpacing[0]), column 0 = the step between consecutive
  slices sorted along the slice normal (row cosine x column cosine), ascending,
  column 3 = ImagePositionPatient of slice 0.  PatientPosition (HFS, FFS, HFDL...)
  is never "corrected" for: IPP/IOP already encode it;
* ``meta``: non-identifying header fields only (never names, IDs, dates, institution).

Supported storage: classic single-frame (one file per slice), enhanced multi-frame
(geometry and rescale per frame from the Per-frame / Shared Functional Groups, one
or several files), Siemens mosaic (de-tiled with the CSA header), and every transfer
syntax pydicom can decode with the installed plugins (implicit/explicit VR little
endian, big endian, deflate, JPEG lossless/baseline, JPEG-LS, JPEG 2000, RLE).
Everything else raises :class:`SeriesError` with one line naming the file.

All series, whatever their storage, go through one path: every file is expanded
into *frames* (a slice, an enhanced frame, or a mosaic tile) with their own
position, orientation and rescale; the frames are sorted along the slice normal,
grouped by position (repeats = volumes), checked (orientation, matrix, spacing,
duplicates, gaps, even spacing, complete volumes) and only then decoded.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ingest import first_line

__all__ = ["SeriesError", "ReadPlan", "looks_like_dicom", "plan_is_current", "read_plan", "read_series",
           "parse_csa_header", "siemens_csa_image_header"]


class SeriesError(ValueError):
    """A series that cannot be read; the message is one line: "<file or folder>: <reason>"."""

    def __init__(self, message: str):
        # exception texts of decoders can span lines; a manifest reason must not
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


# Tolerances (mm unless said otherwise).
_ORIENT_TOL = 1e-3        # direction cosines of frames of one series (about 0.06 degree)
_SPACING_TOL = 1e-3       # PixelSpacing of frames of one series
_SAME_POS_MM = 0.05       # two frames closer than this along the normal share a slice position
_INPLANE_TOL_MM = 0.1     # frames at one slice position must start at the same point
_STEP_REL_TOL = 0.02      # slice steps may differ by 2 % (+ 0.01 mm) before "uneven"
_STEP_ABS_TOL = 0.01

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",  # deflated: pydicom inflates the whole dataset on read
}


# ------------------------------------------------------------------- Siemens CSA header

def parse_csa_header(raw: bytes) -> dict[str, list[str]]:
    """Parse a Siemens CSA2 header (``(0029,xx10)`` image / ``(0029,xx20)`` series info).

    Written here because the only Python reader of it, ``nibabel.nicom.csareader``,
    lives in a module that nibabel itself flags as experimental and unstable; the
    format is small.  CSA2 layout (all integers little-endian, whatever the DICOM
    transfer syntax)::

        offset 0   4 bytes  b"SV10"                      signature of CSA2
               4   4 bytes  unused (b"\\x04\\x03\\x02\\x01")
               8   uint32   number of tags (1..128)
              12   uint32   unused (77)
        then, per tag (84 bytes + items):
                   64 bytes name, NUL-terminated ASCII ("NumberOfImagesInMosaic")
                   int32    VM
                   4 bytes  VR, NUL-terminated ("US", "FD", "IS"...)
                   int32    SyngoDT
                   int32    number of items
                   int32    77 or 205 (check value)
            then, per item:
                   4 x int32 (xx0, item_length, xx2, xx3)
                   item_length bytes of ASCII text (NUL-padded), then padding up to a
                   multiple of 4 bytes
    Values are returned as text, one string per non-empty item, NULs stripped.
    The older CSA1 layout (no "SV10", lengths coded differently) is refused:
    ValueError, like any malformed header (lengths running past the buffer).
    """
    if len(raw) < 16 or raw[:4] != b"SV10":
        raise ValueError("not a CSA2 header (no 'SV10' signature)")
    n_tags, _ = struct.unpack_from("<2I", raw, 8)
    if not 1 <= n_tags <= 128:
        raise ValueError(f"CSA header claims {n_tags} tags (1..128 expected): corrupt")
    pos = 16
    out: dict[str, list[str]] = {}
    for _ in range(n_tags):
        if pos + 84 > len(raw):
            raise ValueError("CSA header truncated inside a tag")
        name_b, _vm, _vr, _dt, n_items, _chk = struct.unpack_from("<64si4s3i", raw, pos)
        pos += 84
        if not 0 <= n_items <= 10000:
            raise ValueError(f"CSA tag with {n_items} items: corrupt")
        name = name_b.split(b"\0", 1)[0].decode("latin-1")
        items: list[str] = []
        for _ in range(n_items):
            if pos + 16 > len(raw):
                raise ValueError("CSA header truncated inside an item")
            _x0, length, _x2, _x3 = struct.unpack_from("<4i", raw, pos)
            pos += 16
            if length < 0 or pos + length > len(raw):
                raise ValueError("CSA item runs past the end of the header")
            text = raw[pos:pos + length].split(b"\0", 1)[0].decode("latin-1").strip()
            if text:
                items.append(text)
            pos += (length + 3) // 4 * 4
        out[name] = items
    return out


def siemens_csa_image_header(ds) -> dict[str, list[str]] | None:
    """The CSA Image Header Info of a Siemens dataset, parsed; None when absent/unreadable."""
    try:
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER")
        raw = block[0x10].value
    except (KeyError, ValueError):
        return None
    if not isinstance(raw, (bytes, bytearray)):
        return None
    try:
        return parse_csa_header(bytes(raw))
    except (ValueError, struct.error):
        return None


# ----------------------------------------------------------------------------- helpers

_COMPONENTS = ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY")
# ImageType values that name the component (Siemens and Philips write M / P / R / I)
_COMPONENT_OF_TYPE = {"M": "MAGNITUDE", "P": "PHASE", "R": "REAL", "I": "IMAGINARY",
                      **{c: c for c in _COMPONENTS}}


def complex_component(ds) -> str:
    """MAGNITUDE, PHASE, REAL, IMAGINARY (or FIELD_MAP, below) for a classic image whose header
    says which, else "".

    In order: ComplexImageComponent (0008,9208); GE's private image type (0043,xx2F of
    GEMS_PARM_01: 0 to 3), the only place a GE series that keeps magnitude, phase, real and
    imaginary images together tells them apart (their ImageType is the same); a value of
    ImageType after the first two. dcm2niix reads the same three and never stacks images of
    different components into one volume. "FIELD_MAP" for the field-map (Hz) images of a GE
    B0 map, which GE stores with its magnitude images under one private image type
    (:func:`_ge_b0map_field_image`)."""
    v = str(ds.get("ComplexImageComponent", "") or "").strip().upper()
    if v in _COMPONENTS:
        return v
    if str(ds.get("Manufacturer", "") or "").strip().upper().startswith("GE"):
        if _ge_b0map_field_image(ds):
            return "FIELD_MAP"
        raw = _ge_private_int(ds, 0x0043, "GEMS_PARM_01", 0x2F)
        if raw is not None and 0 <= raw < len(_COMPONENTS):
            return _COMPONENTS[raw]
    itype = ds.get("ImageType")
    values = itype.split("\\") if isinstance(itype, str) else list(itype or [])
    for t in values[2:]:
        c = _COMPONENT_OF_TYPE.get(str(t).strip().upper())
        if c:
            return c
    return ""


def _private_value(ds, group: int, creator: str, offset: int):
    """Element ``offset`` of ``creator``'s private block in ``group`` (None if absent)."""
    try:
        return ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError):
        return None


def _private_text(ds, group: int, creator: str, offset: int) -> str:
    v = _private_value(ds, group, creator, offset)
    if isinstance(v, bytes):  # UN
        v = v.decode("latin-1")
    return v if isinstance(v, str) else ""


def _ge_private_int(ds, group: int, creator: str, offset: int) -> int | None:
    raw = _private_value(ds, group, creator, offset)
    if isinstance(raw, (bytes, bytearray)):  # UN: an SS, little endian
        return int.from_bytes(bytes(raw[:2]), "little", signed=True) if len(raw) >= 2 else None
    if isinstance(raw, (list, tuple)):
        raw = raw[0] if raw else None
    return raw if isinstance(raw, int) else None


def _ge_b0map_field_image(ds) -> bool:
    """An image of the field-map (Hz) volume of a GE B0 map. GE writes the map and its magnitude
    as one series with the same ImageType and private image type; only the instance number
    tells them apart: the first LocationsInAcquisition (0021,xx4F) images, times the ZIP factor,
    are the map (as dcm2niix reads it, which names that volume ``_fieldmaphz``)."""
    # cheapest first: every GE slice of every series comes through here
    images, inst = _i(ds.get("ImagesInAcquisition")), _i(ds.get("InstanceNumber"))
    if not images or inst is None:
        return False
    locations = _ge_private_int(ds, 0x0021, "GEMS_RELA_01", 0x4F)
    if not locations or locations <= 0 or images == locations:
        return False
    # ZIP slice interpolation: GE counts acquired locations, the series holds the interpolated ones
    thick, gap = _f(ds.get("SliceThickness")), _f(ds.get("SpacingBetweenSlices"))
    if thick and gap and gap > 0 and round(thick / gap) > 1:
        locations *= round(thick / gap)
    if inst > locations:
        return False
    return any("b0map" in _private_text(ds, 0x0019, "GEMS_ACQU_01", el).lower() for el in (0x9C, 0x9E))


def ge_pepolar_reversed(ds) -> bool:
    """True for an image of GE's ``epi_pepolar`` sequence acquired with reversed phase-encoding
    polarity. GE stores those with their rows in reverse order and the header unchanged, so read as
    the header says they are upside down. UserData12 (0019,xxB3) gives the mode: 0 forward,
    1 reversed, 2 reversed then forward, 3 forward then reversed (alternating volumes, counted by
    TemporalPositionIdentifier), as dcm2niix reads it."""
    if not str(ds.get("Manufacturer", "") or "").strip().upper().startswith("GE"):
        return False
    if "epi_pepolar" not in _private_text(ds, 0x0019, "GEMS_ACQU_01", 0x9C):
        return False
    raw = _private_value(ds, 0x0019, "GEMS_ACQU_01", 0xB3)
    mode = _i(raw.decode("latin-1") if isinstance(raw, bytes) else raw)
    volume = _i(ds.get("TemporalPositionIdentifier"))
    if mode == 1:
        return True
    if mode in (2, 3) and volume is not None and volume > 0:
        return volume % 2 == (1 if mode == 2 else 0)
    return False


def acquisition_fields(ds, frame: int = 0) -> tuple[list[str], str, float | None, float | None]:
    """ImageType, sequence name, TE and TI from a classic header or, for enhanced objects,
    from the functional groups (EffectiveEchoTime, InversionTimes, PulseSequenceName)."""
    itype = ds.get("ImageType")
    if itype is None or itype == "":
        image_type = []
    elif isinstance(itype, str):
        image_type = [t.strip() for t in itype.split("\\")]
    else:
        image_type = [str(t).strip() for t in itype]
    seq = str(ds.get("SequenceName", "") or "").strip() or str(_find(ds, "PulseSequenceName", frame) or "").strip()
    te = _f(ds.get("EchoTime"))
    if te is None:
        te = _f(_find(ds, "EffectiveEchoTime", frame))
    ti = _f(ds.get("InversionTime"))
    if ti is None:
        ti = _f(_find(ds, "InversionTimes", frame))
    return image_type, seq, te, ti


def _f(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        if isinstance(v, (list, tuple)) or (isinstance(v, Sequence) and not isinstance(v, (str, bytes))):
            if not len(v):
                return None
            v = v[0]
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _i(v) -> int | None:
    x = _f(v)
    return None if x is None else int(round(x))


def _vec(v, n: int, what: str, path: Path) -> np.ndarray:
    if v is None or v == "":
        raise SeriesError(f"{path}: no {what}: cannot place the image in space")
    if isinstance(v, (str, bytes, int, float)):  # one value where the attribute needs n
        v = [v]
    try:
        xs = [float(x) for x in v]
    except (TypeError, ValueError):
        raise SeriesError(f"{path}: unreadable {what} {v!r}: not {n} numbers") from None
    # checked on the floats: numpy's isfinite/all on a 3-vector cost more than the parse, per file
    if len(xs) != n or not all(math.isfinite(x) for x in xs):
        raise SeriesError(f"{path}: {what} must hold {n} numbers, got {list(v)!r}")
    return np.array(xs, dtype=np.float64)


def _unit(v: np.ndarray, what: str, path: Path) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not n > 0.5:  # a cosine vector: length 1 up to rounding
        raise SeriesError(f"{path}: {what} {v.tolist()} is not a unit vector")
    return v / n


def _dt_seconds(date_time: str | None) -> float | None:
    """DICOM DT / TM text -> seconds (only for ordering)."""
    if not date_time:
        return None
    s = str(date_time).strip().split("+")[0].split("-")[0]
    try:
        if len(s) >= 14 and "." not in s[:14]:  # DT: YYYYMMDDHHMMSS[.ffffff]
            d = s[:14]
            if not (d.isascii() and d.isdigit()):
                return None
            # datetime() checks the ranges as strptime did, at a tenth of its cost per file
            base = datetime(int(d[:4]), int(d[4:6]), int(d[6:8]), int(d[8:10]), int(d[10:12]),
                            int(d[12:14])).timestamp()
            frac = float("0" + s[14:]) if len(s) > 14 and s[14] == "." else 0.0
            return base + frac
        # TM: HHMMSS[.ffffff] or HH:MM:SS
        s = s.replace(":", "")
        hh, mm = int(s[0:2] or 0), int(s[2:4] or 0)
        ss = float(s[4:] or 0)
        return hh * 3600 + mm * 60 + ss
    except ValueError:
        return None


def _acquired_at(ds) -> float | None:
    """When a classic image was acquired, in seconds, for ordering: with its date where the file
    gives one, so a series that runs past midnight keeps its volumes in order."""
    dt = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if dt:
        return _dt_seconds(dt)
    tm = str(ds.get("AcquisitionTime", "") or "").strip().replace(":", "")
    date = str(ds.get("AcquisitionDate", "") or "").strip()
    if tm and len(date) == 8 and date.isdigit():
        whole, _, frac = tm.partition(".")
        if whole.isdigit() and len(whole) <= 6:
            return _dt_seconds(date + whole.ljust(6, "0") + (f".{frac}" if frac else ""))
    return _dt_seconds(tm)


def _fg_item(ds, frame: int, macro: str):
    """First item of functional-group macro `macro` for one frame (per-frame, else shared)."""
    for fg_kw, idx in (("PerFrameFunctionalGroupsSequence", frame),
                       ("SharedFunctionalGroupsSequence", 0)):
        fg = ds.get(fg_kw)
        if fg is None or len(fg) <= idx:
            continue
        seq = fg[idx].get(macro)
        if seq is not None and len(seq):
            return seq[0]
    return None


def _fg_macros(ds, frame: int):
    """The functional-group macros (non-empty sequence elements) of one frame: its
    per-frame group first, then the shared one."""
    for fg_kw, idx in (("PerFrameFunctionalGroupsSequence", frame),
                       ("SharedFunctionalGroupsSequence", 0)):
        fg = ds.get(fg_kw)
        if fg is None or len(fg) <= idx:
            continue
        for elem in fg[idx]:
            if elem.VR == "SQ" and elem.value:
                yield elem


def enhanced_frame_type(ds, frame: int) -> str:
    """FrameType of one frame of an enhanced object, from whichever ``*FrameTypeSequence``
    its modality uses (MR, CT, ...), per-frame before shared; "" when absent."""
    for elem in _fg_macros(ds, frame):
        if elem.keyword.endswith("FrameTypeSequence"):
            v = elem.value[0].get("FrameType")
            if v:
                vals = [v] if isinstance(v, str) else list(v)
                return "\\".join(str(x).strip().upper() for x in vals)
    return ""


def _fg_attr(ds, frame: int, macro: str, keyword: str):
    item = _fg_item(ds, frame, macro)
    if item is not None:
        v = item.get(keyword)
        if v is not None and v != "":
            return v
    return None


def _find(ds, keyword: str, frame: int = 0):
    """A value at the top level, else in any functional-group macro of `frame`."""
    v = ds.get(keyword)
    if v is not None and v != "":
        return v
    for elem in _fg_macros(ds, frame):
        v = elem.value[0].get(keyword)
        if v is not None and v != "":
            return v
    return None


def _ts_of(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts).strip()
    # no file meta: what pydicom decoded it as
    implicit, le = getattr(ds, "original_encoding", (True, True))
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if le else "1.2.840.10008.1.2.2"


def _ts_text(ts: str) -> str:
    from pydicom.uid import UID

    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


# ------------------------------------------------------------------------------ frames

@dataclass
class _Frame:
    file: int                    # index into the sorted file list
    frame: int                   # frame index in the decoded pixel array of that file
    tile: tuple[int, int] | None  # (row, column) offset of a mosaic tile, else None
    rows: int
    cols: int
    ipp: np.ndarray
    iop: np.ndarray
    spacing: np.ndarray          # (row spacing, column spacing)
    slope: float
    intercept: float
    tkey: tuple                  # acquisition-order key among frames at one position
    tpi: int | None              # temporal position (identifier / index), when given
    echo: int | None
    ftype: str = ""              # enhanced: the frame's FrameType, values joined by "\\"
    te: float | None = None      # enhanced: the frame's EffectiveEchoTime (MR Echo macro)


def _rescale(slope, intercept, path: Path) -> tuple[float, float]:
    s = _f(slope)
    b = _f(intercept)
    s = 1.0 if s is None else s
    b = 0.0 if b is None else b
    if s == 0.0:
        raise SeriesError(f"{path}: RescaleSlope is 0: every voxel would be {b}")
    return s, b


def _time_key(tpi, acq, t, inst, frame) -> tuple:
    def k(v):
        return (0, 0.0) if v is None else (1, float(v))
    return (k(tpi), k(acq), k(t), k(inst), frame)


def _is_mosaic(ds) -> bool:
    itype = ds.get("ImageType")
    if itype is None:
        return False
    vals = [str(v).strip().upper() for v in (itype if not isinstance(itype, str) else itype.split("\\"))]
    return "MOSAIC" in vals


def _mosaic_count(ds, csa: dict | None, path: Path) -> int:
    n = None
    try:  # (0019,xx0A) NumberOfImagesInMosaic, private creator "SIEMENS MR HEADER"
        n = _i(ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value)
    except (KeyError, ValueError):
        n = None
    if not n and csa is not None:
        n = _i((csa.get("NumberOfImagesInMosaic") or [None])[0])
    if not n or n < 1:
        raise SeriesError(
            f"{path}: Siemens MOSAIC image without NumberOfImagesInMosaic (neither (0019,100A) nor "
            "the CSA image header (0029,1010)): cannot de-tile; was the private header removed?")
    return n


def _uih_grid(ds, path: Path, fidx: int, rows: int, cols: int, acq, inst, echo) -> list[_Frame] | None:
    """Frames of a UIH grid (mosaic) image, or None when the image is not a grid.

    UIH tiles n slices row by row, ceil(sqrt(n)) tiles a row and as many rows as needed (20
    slices: 4 rows of 5; dcm2niix nii_demosaic, isUIH). Unlike a Siemens mosaic it leaves
    ImagePositionPatient out of the top level and gives each tile its own, in the items of
    the private sequence (0065,xx51), one item per tile in tile order.
    """
    n = _i(_private_value(ds, 0x0065, "Image Private Header", 0x50))
    if not n or n < 2:
        return None
    n_col = math.ceil(math.sqrt(n))
    n_row = math.ceil(n / n_col)
    if rows % n_row or cols % n_col:
        raise SeriesError(f"{path}: UIH grid of {rows}x{cols} pixels cannot hold {n_row} rows of {n_col} "
                          f"tiles for its {n} slices (0065,1050): inconsistent slice count")
    items = _private_value(ds, 0x0065, "Image Private Header", 0x51)
    if not items or len(items) != n:
        raise SeriesError(f"{path}: UIH grid of {n} slices without one (0065,1051) item per slice "
                          f"({len(items) if items else 0} found): the slices cannot be placed "
                          "(private header removed by an anonymiser?)")
    iop = _vec(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path)
    ps = _vec(ds.get("PixelSpacing"), 2, "PixelSpacing", path)
    slope, icpt = _rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), path)
    tpi = _i(ds.get("TemporalPositionIdentifier"))
    key = _time_key(tpi, acq, _acquired_at(ds), inst, 0)
    tr, tc = rows // n_row, cols // n_col
    return [_Frame(fidx, 0, ((k // n_col) * tr, (k % n_col) * tc), tr, tc,
                   _vec(item.get("ImagePositionPatient"), 3, f"ImagePositionPatient of grid tile {k + 1}", path),
                   iop, ps, slope, icpt, key, tpi, echo)
            for k, item in enumerate(items)]


def _frames_of(ds, path: Path, fidx: int) -> tuple[list[_Frame], str]:
    """Frames of one file and its kind ("classic", "enhanced", "mosaic")."""
    rows, cols = _i(ds.get("Rows")), _i(ds.get("Columns"))
    if not rows or not cols:
        raise SeriesError(f"{path}: no Rows/Columns: not an image")
    n_frames = _i(ds.get("NumberOfFrames")) or 1
    has_fg = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    manufacturer = str(ds.get("Manufacturer", "")).upper()
    acq = _i(ds.get("AcquisitionNumber"))
    inst = _i(ds.get("InstanceNumber"))
    echo = _i(ds.get("EchoNumbers"))
    if manufacturer.startswith("UIH") or "UNITED IMAGING" in manufacturer:
        grid = _uih_grid(ds, path, fidx, rows, cols, acq, inst, echo)
        if grid is not None:
            return grid, "mosaic"

    if has_fg:
        frames = []
        pffg = ds.get("PerFrameFunctionalGroupsSequence")
        if pffg is not None and len(pffg) not in (0, n_frames):
            raise SeriesError(f"{path}: {len(pffg)} per-frame functional groups for {n_frames} frames: corrupt header")
        top_slope, top_icpt = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        for i in range(n_frames):
            ipp = _vec(_fg_attr(ds, i, "PlanePositionSequence", "ImagePositionPatient")
                       or ds.get("ImagePositionPatient"), 3, f"ImagePositionPatient of frame {i + 1}", path)
            iop = _vec(_fg_attr(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
                       or ds.get("ImageOrientationPatient"), 6, f"ImageOrientationPatient of frame {i + 1}", path)
            ps = _vec(_fg_attr(ds, i, "PixelMeasuresSequence", "PixelSpacing")
                      or ds.get("PixelSpacing"), 2, f"PixelSpacing of frame {i + 1}", path)
            pvt = _fg_item(ds, i, "PixelValueTransformationSequence")
            if pvt is not None and (pvt.get("RescaleSlope") is not None or pvt.get("RescaleIntercept") is not None):
                slope, icpt = _rescale(pvt.get("RescaleSlope"), pvt.get("RescaleIntercept"), path)
            else:
                slope, icpt = _rescale(top_slope, top_icpt, path)
            fc = _fg_item(ds, i, "FrameContentSequence")
            tpi = _i(fc.get("TemporalPositionIndex")) if fc is not None else None
            facq = _i(fc.get("FrameAcquisitionNumber")) if fc is not None else None
            ftime = _dt_seconds(str(fc.get("FrameAcquisitionDateTime", "")) if fc is not None else None)
            frames.append(_Frame(fidx, i, None, rows, cols, ipp, iop, ps, slope, icpt,
                                 _time_key(tpi, facq if facq is not None else acq, ftime, inst, i),
                                 tpi, echo, enhanced_frame_type(ds, i),
                                 _f(_fg_attr(ds, i, "MREchoSequence", "EffectiveEchoTime"))))
        return frames, "enhanced"

    if n_frames > 1:
        raise SeriesError(
            f"{path}: {n_frames}-frame image without functional groups: no per-frame position, "
            "cannot build a volume (legacy multi-frame is not supported)")
    ipp = _vec(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path)
    iop = _vec(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path)
    ps = _vec(ds.get("PixelSpacing"), 2, "PixelSpacing", path)
    slope, icpt = _rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), path)
    tpi = _i(ds.get("TemporalPositionIdentifier"))
    t = _acquired_at(ds)
    key = _time_key(tpi, acq, t, inst, 0)

    if not _is_mosaic(ds):
        return [_Frame(fidx, 0, None, rows, cols, ipp, iop, ps, slope, icpt, key, tpi, echo)], "classic"

    # Siemens mosaic: n slices tiled row by row in a g x g grid, g = ceil(sqrt(n)).
    csa = siemens_csa_image_header(ds)
    n = _mosaic_count(ds, csa, path)
    g = math.ceil(math.sqrt(n))
    if rows % g or cols % g:
        raise SeriesError(f"{path}: mosaic of {rows}x{cols} pixels cannot hold a {g}x{g} grid of "
                          f"{n} images: inconsistent NumberOfImagesInMosaic")
    tr, tc = rows // g, cols // g
    row_dir = _unit(iop[:3], "row direction cosine", path)
    col_dir = _unit(iop[3:], "column direction cosine", path)
    # IPP of a mosaic is the top-left corner of the whole tiled image; the first tile
    # starts (cols - tile_cols)/2 columns and (rows - tile_rows)/2 rows further
    # (dcm2niix nii_dicom.cpp set_nii_header_x: lFactorX/lFactorY; nibabel
    # dicomwrappers.MosaicWrapper.image_position: the same correction).
    ipp0 = ipp + row_dir * ps[1] * (cols - tc) / 2.0 + col_dir * ps[0] * (rows - tr) / 2.0
    # Tiles are stored in the order of the CSA SliceNormalVector, which may point
    # against row x column ("Siemens sagittal are R>>L", dcm2niix set_nii_header_x:
    # it flips the slice axis when det[row, column, SliceNormalVector] < 0).  Tile k
    # sits k slice spacings from the first along +/- the normal, by that sign.  Without
    # the vector the order is unknown: refuse rather than risk a flipped volume.
    normal = np.cross(row_dir, col_dir)
    snv = None
    if csa is not None and len(csa.get("SliceNormalVector", [])) == 3:
        try:
            snv = np.array([float(x) for x in csa["SliceNormalVector"]])
        except ValueError:
            snv = None
    if snv is None or abs(float(snv @ normal)) < 0.5 * max(float(np.linalg.norm(snv)), 1e-9):
        raise SeriesError(
            f"{path}: Siemens mosaic without a usable SliceNormalVector in the CSA image header (0029,1010): "
            "the order of its slices is unknown (private header removed by an anonymiser?)")
    direction = normal if float(snv @ normal) > 0 else -normal
    spacing = _f(ds.get("SpacingBetweenSlices")) or _f(ds.get("SliceThickness"))
    if not spacing or spacing <= 0:
        raise SeriesError(f"{path}: mosaic without SpacingBetweenSlices or SliceThickness: "
                          "cannot place its slices")
    frames = []
    for k in range(n):
        frames.append(_Frame(fidx, 0, ((k // g) * tr, (k % g) * tc), tr, tc,
                             ipp0 + k * spacing * direction, iop, ps, slope, icpt, key, tpi, echo))
    return frames, "mosaic"


# ------------------------------------------------------------------------ pixel data

def _select_frame_type(frames: list[_Frame], frame_type, plist: list[Path]) -> list[_Frame]:
    files = {fr.file for fr in frames}
    where = plist[files.pop()] if len(files) == 1 else _where(plist)
    counts: dict[str, int] = {}
    for fr in frames:
        counts[fr.ftype] = counts.get(fr.ftype, 0) + 1
    if frame_type is not None:
        vals = frame_type.split("\\") if isinstance(frame_type, str) else frame_type
        want = "\\".join(str(v).strip().upper() for v in vals)
        kept = [fr for fr in frames if fr.ftype == want]
        if not kept:
            raise SeriesError(f"{where}: no frame has FrameType {want} (the series has "
                              f"{'; '.join(k or '(none)' for k in sorted(counts))})")
        return kept
    if len(counts) > 1:
        kinds = "; ".join(f"{k or '(none)'}: {n} frame(s)" for k, n in sorted(counts.items()))
        raise SeriesError(
            f"{where}: frames of {len(counts)} kinds in one series (FrameType {kinds}): not one "
            "volume; export each kind as its own series, or read one with frame_type=")
    return frames


def _check_pixel_data(ds, path: Path, ts: str) -> None:
    kw = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if kw is None:
        raise SeriesError(f"{path}: no pixel data (header-only or non-image object)")
    needed = ("Rows", "Columns", "BitsAllocated") if kw == "PixelData" else ("Rows", "Columns")
    missing = [k for k in needed if not _i(ds.get(k))]
    if missing:
        raise SeriesError(f"{path}: pixel data without {', '.join(missing)}: incomplete Image Pixel "
                          "module, the pixels cannot be laid out")
    spp = _i(ds.get("SamplesPerPixel")) or 1
    colour = is_colour(ds, path)
    if spp != 1 and kw != "PixelData":
        raise SeriesError(f"{path}: {spp} samples per pixel in {kw}: float pixel data is greyscale only "
                          "(PS3.3 C.7.6.24)")
    if str(ts) in _NATIVE_SYNTAXES:
        raw = ds.get_item(kw)
        actual = len(raw.value) if raw.value is not None else 0
        declared = getattr(raw, "length", actual)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = _i(ds.get("NumberOfFrames")) or 1
        bits = _i(ds.get("BitsAllocated")) or {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(kw, 16)
        if colour in _YBR_COMPRESSED_ONLY:
            raise SeriesError(f"{path}: PhotometricInterpretation {colour} in uncompressed pixel data: the "
                              "standard allows it only in compressed transfer syntaxes (PS3.5 8.2)")
        # YBR_FULL_422 keeps Cb and Cr for every other column: two samples a pixel (PS3.3 C.7.6.3.1.2)
        samples = 2 if colour == "YBR_FULL_422" else spp
        if bits == 1:
            need = (rows * cols * frames * samples + 7) // 8
        else:
            need = rows * cols * frames * samples * (bits // 8)
        if declared not in (None, 0xFFFFFFFF) and actual < declared:
            raise SeriesError(
                f"{path}: pixel data truncated: the file ends {actual} bytes into its {declared}-byte "
                "Pixel Data element (incomplete copy?)")
        if actual < need:
            if need >= 2 * actual:
                raise SeriesError(
                    f"{path}: Rows x Columns ({rows} x {cols}) x {frames} frame(s) x {samples} sample(s) x "
                    f"{bits // 8 or 1} byte(s) = {need} bytes, far more than the {actual} bytes of pixel data present: "
                    "header and pixel data disagree (corrupt or edited header)")
            raise SeriesError(
                f"{path}: pixel data shorter than Rows x Columns x frames x samples x bytes: {actual} bytes present, "
                f"{need} needed (truncated?)")
        if need and actual >= 2 * need:
            # whole frames more than the header describes (NumberOfFrames dropped, Rows edited):
            # reading the first frame alone would be a silently wrong image
            raise SeriesError(
                f"{path}: {actual} bytes of pixel data, {actual // need} times the {need} that Rows x Columns "
                f"({rows} x {cols}) x {frames} frame(s) x {samples} sample(s) x {bits // 8 or 1} byte(s) "
                "describe: header and pixel data disagree (corrupt or edited header)")
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise SeriesError(
            f"{path}: transfer syntax {_ts_text(ts)} is not supported: no installed pixel decoder "
            "handles it; ask for an uncompressed or a lossless JPEG / JPEG-LS / JPEG 2000 / RLE export") from None
    if not decoder.is_available:
        missing = "; ".join(f"{k}: {v}" for k, v in decoder.missing_dependencies.items()) \
            if hasattr(decoder, "missing_dependencies") else ""
        raise SeriesError(f"{path}: transfer syntax {_ts_text(ts)} needs a pixel decoder plugin that is not "
                          f"installed ({missing or 'see pydicom pixel handlers'})")


_YBR = ("YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
_YBR_COMPRESSED_ONLY = ("YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")


def _pixel_layout(ds) -> tuple[int, str]:
    return _i(ds.get("SamplesPerPixel")) or 1, str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def colour_model(ds) -> str | None:
    """The colour model of a dataset's pixels ("RGB", a "YBR_..." one or "PALETTE COLOR"), ""
    for greyscale, None for a SamplesPerPixel and PhotometricInterpretation that disagree."""
    spp, pi = _pixel_layout(ds)
    if spp == 1 and pi in ("", "MONOCHROME1", "MONOCHROME2"):
        return ""
    if (spp, pi) == (1, "PALETTE COLOR") or (spp == 3 and (pi == "RGB" or pi in _YBR)):
        return pi
    return None


def is_colour(ds, path: Path) -> str:
    """`colour_model`, refusing a layout the standard does not have: read one way when the
    other was meant, an image comes out as noise or as palette indices."""
    colour = colour_model(ds)
    if colour is not None:
        return colour
    spp, pi = _pixel_layout(ds)
    raise SeriesError(f"{path}: {spp} sample(s) per pixel with PhotometricInterpretation {pi or '(none)'}: "
                      "not a pixel layout of the DICOM standard (PS3.3 C.7.6.3.1.2)")


def _decode(ds, path: Path, ts: str) -> np.ndarray:
    """Stored values, shape (frames, rows, cols), or (frames, rows, cols, 3) RGB for a colour
    image: YBR converted to RGB as dcm2niix writes it; palette indices looked up in the file's
    palette (the LUT's own values, 8 or 16 bits; dcm2niix writes the indices)."""
    colour = is_colour(ds, path)
    try:
        arr = ds.pixel_array   # pydicom turns YBR into RGB by default
        if colour == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        msg = first_line(exc)
        raise SeriesError(f"{path}: cannot decode the {_ts_text(ts)} pixel data: {msg}") from None
    arr = np.asarray(arr)
    n_frames = _i(ds.get("NumberOfFrames")) or 1
    want = (n_frames, int(ds.Rows), int(ds.Columns)) + ((3,) if colour else ())
    if arr.ndim == len(want) - 1:
        arr = arr[None]
    if arr.shape != want:
        raise SeriesError(f"{path}: decoded pixel data has shape {arr.shape}, expected {want}")
    return arr


# ---------------------------------------------------------------------------- geometry

def _fmt_pos(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in p) + ") mm"


def _where(paths: list[Path]) -> Path:
    parents = {p.parent for p in paths}
    return parents.pop() if len(parents) == 1 else paths[0]


def _check_consistency(frames: list[_Frame], paths: list[Path], kind: str) -> None:
    f0 = frames[0]
    # all frames at once (a per-frame np.allclose cost more than parsing on small slices);
    # the first frame that disagrees is then checked as before, for its message
    dims = np.array([(fr.rows, fr.cols) for fr in frames])
    iops = np.array([fr.iop for fr in frames])
    sps = np.array([fr.spacing for fr in frames])
    bad = (np.any(dims != dims[0], axis=1)
           | ~np.all(np.abs(iops - f0.iop) <= _ORIENT_TOL, axis=1)
           | ~np.all(np.abs(sps - f0.spacing) <= _SPACING_TOL, axis=1))
    if not bad.any():
        return
    fr = frames[int(np.argmax(bad))]
    p, p0 = _frame_name(fr, paths, kind), _frame_name(f0, paths, kind)
    if (fr.rows, fr.cols) != (f0.rows, f0.cols):
        raise SeriesError(
            f"{p}: image is {fr.rows} x {fr.cols} (rows x columns) but {p0} is {f0.rows} x {f0.cols}: "
            "inconsistent dimensions, not one series")
    if not np.allclose(fr.iop, f0.iop, atol=_ORIENT_TOL, rtol=0):
        raise SeriesError(
            f"{p}: orientation {np.round(fr.iop, 4).tolist()} differs from {np.round(f0.iop, 4).tolist()} "
            f"of {p0}: not one stack (split the series by orientation)")
    raise SeriesError(
        f"{p}: pixel spacing {fr.spacing.tolist()} differs from {f0.spacing.tolist()} of {p0}: "
        "not one series")


def _cluster_positions(frames: list[_Frame], normal: np.ndarray, paths: list[Path]):
    """Frames grouped by slice position (ascending along the normal)."""
    d = np.array([float(fr.ipp @ normal) for fr in frames])
    order = sorted(range(len(frames)), key=lambda i: (d[i], frames[i].tkey))
    clusters: list[list[int]] = []
    for i in order:
        if clusters and d[i] - d[clusters[-1][0]] <= _SAME_POS_MM:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for c in clusters:
        ref = frames[c[0]].ipp
        for i in c[1:]:
            if np.linalg.norm(frames[i].ipp - ref) > _INPLANE_TOL_MM:
                raise SeriesError(
                    f"{paths[frames[i].file]}: slice at {_fmt_pos(frames[i].ipp)} lies in the plane of "
                    f"{paths[frames[c[0]].file]} ({_fmt_pos(ref)}) but starts elsewhere: two stacks in one series?")
        c.sort(key=lambda i: frames[i].tkey)
    return clusters, d


def _check_one_echo(frames: list[_Frame], paths: list[Path], kind: str, where) -> None:
    """Echoes are not volumes: stacked as a time series they would pass as one, TE the first's."""
    by_echo: dict = {}
    for fr in frames:
        if fr.te is not None:  # to 0.01 ms: exports round the same echo time differently
            by_echo.setdefault(("TE", round(fr.te, 2)), fr)
        elif fr.echo is not None:
            by_echo.setdefault(("echo", fr.echo), fr)
    if len({k[0] for k in by_echo}) == 1 and len(by_echo) > 1:
        what = ", ".join(f"{k[0]} {k[1]:g}" for k in sorted(by_echo))
        names = [_frame_name(by_echo[k], paths, kind) for k in sorted(by_echo)[:2]]
        raise SeriesError(
            f"{where}: holds images of {len(by_echo)} echoes ({what}; e.g. {names[0]} and {names[1]}): one "
            "series per echo, as dcm2niix writes them (ingest.group_series splits classic files by echo; an "
            "enhanced object must be exported one echo per series)")


def _frame_name(fr: _Frame, paths: list[Path], kind: str) -> str:
    p = paths[fr.file]
    if kind == "enhanced":
        return f"{p} frame {fr.frame + 1}"
    if kind == "mosaic":
        return f"{p} (mosaic tile)"
    return str(p)


def _check_counts(clusters, frames, paths, kind, pixels_of=None) -> int:
    counts = [len(c) for c in clusters]
    common = Counter(counts).most_common()
    n_vol = max(common, key=lambda kv: (kv[1], -kv[0]))[0]  # most frequent, fewer volumes on a tie
    for c in clusters:
        for a, b in zip(c, c[1:]):
            # images at one position are volumes only if something orders them: a copy with a new
            # SOPInstanceUID (a re-store, "save as") has the same keys and would be one more volume
            if frames[a].tkey == frames[b].tkey:
                fa, fb = frames[a], frames[b]
                names = _frame_name(fb, paths, kind), _frame_name(fa, paths, kind)
                keys = "TemporalPositionIdentifier, AcquisitionNumber, acquisition time and InstanceNumber"
                if pixels_of is not None and fa.file != fb.file and pixels_of(fa.file) == pixels_of(fb.file):
                    raise SeriesError(f"{names[0]}: duplicated image: {names[1]} is at the same position "
                                      f"{_fmt_pos(fa.ipp)} with the same {keys} and the same pixels (a second "
                                      "copy of the image)")
                raise SeriesError(f"{names[0]}: images at one position cannot be put in order: {names[1]} is at "
                                  f"the same position {_fmt_pos(fa.ipp)} with the same {keys} (an anonymiser "
                                  "that dropped InstanceNumber and the times?)")
    for c in clusters:
        if len(c) == n_vol:
            continue
        pos = _fmt_pos(frames[c[0]].ipp)
        names = [_frame_name(frames[i], paths, kind) for i in c]
        if n_vol == 1:
            raise SeriesError(
                f"{names[1]}: duplicated slice position {pos}: {names[0]} is at the same position "
                "(one volume cannot hold two slices at one position)")
        if len(c) > n_vol:
            raise SeriesError(
                f"{names[0]}: slice position {pos} has {len(c)} images but the other positions have "
                f"{n_vol} (one per volume): duplicated slice?")
        raise SeriesError(
            f"{names[0]}: slice position {pos} has {len(c)} images but the other positions have {n_vol} "
            f"(one per volume): a volume is incomplete (missing file?)")
    return n_vol


def _check_spacing(reps: list[_Frame], d: np.ndarray, paths, kind, where) -> np.ndarray:
    """Slice step vector (3,) after checking gaps and even spacing."""
    z = len(reps)
    steps = np.diff(d)
    nominal = float(np.median(steps))
    ratios = steps / nominal
    near = np.rint(ratios)
    tol = _STEP_REL_TOL + _STEP_ABS_TOL / nominal
    on_grid = np.all(np.abs(ratios - near) <= tol * np.maximum(near, 1)) and np.all(near >= 1)
    if on_grid and np.any(near >= 2):
        k = int(np.argmax(near >= 2))
        m = int(near[k])
        a, b = reps[k], reps[k + 1]
        missing = [a.ipp + (b.ipp - a.ipp) * j / m for j in range(1, m)]
        n_missing = int(np.sum(near - 1))
        raise SeriesError(
            f"{where}: missing slice: no image at {', '.join(_fmt_pos(p) for p in missing)} between "
            f"{_frame_name(a, paths, kind)} and {_frame_name(b, paths, kind)} (slices are {nominal:.4g} mm "
            f"apart elsewhere; {n_missing} position(s) missing in all)")
    if not on_grid or np.any(np.abs(ratios - 1) > tol):
        k = int(np.argmax(np.abs(ratios - 1)))
        raise SeriesError(
            f"{where}: unevenly spaced slices: step {steps[k]:.4g} mm between "
            f"{_frame_name(reps[k], paths, kind)} and {_frame_name(reps[k + 1], paths, kind)} against a "
            f"median step of {nominal:.4g} mm (steps range {steps.min():.4g}..{steps.max():.4g} mm)")
    ipps = np.array([r.ipp for r in reps])
    step = (ipps[-1] - ipps[0]) / (z - 1)
    grid = ipps[0][None, :] + np.arange(z)[:, None] * step[None, :]
    dev = np.linalg.norm(ipps - grid, axis=1)
    limit = max(_INPLANE_TOL_MM, _STEP_REL_TOL * float(np.linalg.norm(step)))
    if float(dev.max()) > limit:
        k = int(np.argmax(dev))
        raise SeriesError(
            f"{_frame_name(reps[k], paths, kind)}: slice positions do not lie on one straight line "
            f"({dev.max():.3g} mm off): shifted slices or two stacks in one series")
    return step


# ------------------------------------------------------------------------------- meta

def _units(ds, slope: float | None, intercept: float | None) -> tuple[str | None, dict | None]:
    """Units of the rescaled values when the header says; plus a real-world-value note."""
    rwv = None
    seq = ds.get("RealWorldValueMappingSequence")
    if not seq:
        seq = None
        for fg_kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            fg = ds.get(fg_kw)
            if fg:
                seq = fg[0].get("RealWorldValueMappingSequence")
                if seq:
                    break
    if seq:
        item = seq[0]
        codes = item.get("MeasurementUnitsCodeSequence")
        unit = str(codes[0].get("CodeValue", "")).strip() if codes else ""
        rs, ri = _f(item.get("RealWorldValueSlope")), _f(item.get("RealWorldValueIntercept"))
        rwv = {"units": unit or None, "slope": rs, "intercept": ri}
        same = (slope is not None and intercept is not None
                and (rs is None or math.isclose(rs, slope, rel_tol=1e-6, abs_tol=1e-12))
                and (ri is None or math.isclose(ri, intercept, rel_tol=1e-6, abs_tol=1e-9)))
        if unit and same:
            return unit, rwv
    rtype = str(_find(ds, "RescaleType") or "").strip()
    if rtype and rtype.upper() != "US":
        return rtype, rwv
    return None, rwv


def _philips_scale_slope(ds) -> float | None:
    """Philips private scale slope (2005,xx0E) (for "precise" values = displayed / (RS * SS))."""
    def get(d):
        try:
            return _f(d.private_block(0x2005, "Philips MR Imaging DD 001")[0x0E].value)
        except (KeyError, ValueError):
            return None
    v = get(ds)
    if v is None:
        fg = ds.get("PerFrameFunctionalGroupsSequence")
        if fg:
            try:
                inner = fg[0][0x2005, 0x140F].value[0]
                v = get(inner)
            except (KeyError, IndexError, TypeError, AttributeError):
                v = None
    return v


def _meta(ds, frames_used: list[_Frame], kind: str, ts_list: list[str], n_files: int,
          shape: tuple[int, ...], step: np.ndarray, n_slices: int) -> dict:
    slopes = {fr.slope for fr in frames_used}
    icpts = {fr.intercept for fr in frames_used}
    slope = slopes.pop() if len(slopes) == 1 else None
    icpt = icpts.pop() if len(icpts) == 1 else None
    units, rwv = _units(ds, slope, icpt)
    image_type, seq, te, ti = acquisition_fields(ds)
    ts_unique = sorted(set(ts_list))
    f0 = frames_used[0]
    meta = {
        "manufacturer": str(ds.get("Manufacturer", "") or "").strip(),
        "model": str(ds.get("ManufacturerModelName", "") or "").strip(),
        "modality": str(ds.get("Modality", "") or "").strip(),
        "series_description": str(ds.get("SeriesDescription", "") or "").strip(),
        "protocol_name": str(ds.get("ProtocolName", "") or "").strip(),
        "sequence_name": seq,
        "image_type": image_type,
        "tr": _f(_find(ds, "RepetitionTime")),
        "te": te,
        "ti": ti,
        "flip_angle": _f(_find(ds, "FlipAngle")),
        "echo_numbers": sorted({fr.echo for fr in frames_used if fr.echo is not None}),
        "series_number": _i(ds.get("SeriesNumber")),
        "transfer_syntax": ts_unique[0] if len(ts_unique) == 1 else ts_unique,
        "rows": int(shape[-2]),
        "columns": int(shape[-1]),
        "n_slices": int(n_slices),
        "n_volumes": int(shape[0]) if len(shape) == 4 else 1,
        "pixel_spacing": [float(f0.spacing[0]), float(f0.spacing[1])],
        "slice_thickness": _f(_find(ds, "SliceThickness")),
        "spacing_between_slices": float(np.linalg.norm(step)),
        "rescale_slope": slope,
        "rescale_intercept": icpt,
        "rescale_type": (str(_find(ds, "RescaleType") or "").strip() or None),
        "units": units,
        "patient_position": str(ds.get("PatientPosition", "") or "").strip(),
        "mosaic": kind == "mosaic",
        "enhanced": kind == "enhanced",
        "n_files": int(n_files),
    }
    if slope is None or icpt is None:
        meta["rescale_per_frame"] = True
    if rwv is not None:
        meta["real_world_value_mapping"] = rwv
    pss = _philips_scale_slope(ds)
    if pss is not None:
        meta["philips_scale_slope"] = pss
    return meta


# --------------------------------------------------------------------------- read plans

class ReadPlan(NamedTuple):
    """What :func:`read_series` needs of one healthy classic file (single frame, native
    pixels, parsed by :mod:`ingest.dicomlite`), taken when :func:`ingest.series.scan` parsed
    its header, so that ingest parses each file once. Valid while the file's size and
    modification time are the ones seen then; otherwise the file is read again."""

    size: int
    mtime_ns: int
    transfer_syntax: str
    offset: int                  # of the pixel bytes in the file
    rows: int
    cols: int
    bits: int
    stored: int
    signed: bool
    ipp: tuple[float, ...]
    iop: tuple[float, ...]
    spacing: tuple[float, ...]
    slope: float
    intercept: float
    tkey: tuple
    tpi: int | None
    echo: int | None
    component: str = ""          # see complex_component
    rows_reversed: bool = False  # see ge_pepolar_reversed


def read_plan(ds, path: Path, size: int, mtime_ns: int) -> ReadPlan | None:
    """The plan of a file :mod:`ingest.dicomlite` parsed, when it is a plain classic slice;
    None for anything else (the reader then parses the file itself, with its messages).
    Built with the reader's own frame and pixel checks, so a planned file gives exactly
    what parsing it again would."""
    from ingest.dicomlite import LiteDataset

    if not isinstance(ds, LiteDataset):
        return None
    try:
        ts = _ts_of(ds)
        _check_pixel_data(ds, path, ts)
        frames, kind = _frames_of(ds, path, 0)
    except SeriesError:
        return None
    if kind != "classic" or len(frames) != 1:
        return None
    fr = frames[0]
    offset, rows, cols, bits, stored, signed = ds.pixel_layout()
    if (rows, cols) != (fr.rows, fr.cols):
        return None
    return ReadPlan(size, mtime_ns, str(ts), offset, rows, cols, bits, stored, signed,
                    tuple(fr.ipp.tolist()), tuple(fr.iop.tolist()), tuple(fr.spacing.tolist()),
                    fr.slope, fr.intercept, fr.tkey, fr.tpi, fr.echo, complex_component(ds),
                    ge_pepolar_reversed(ds))


def plan_is_current(p: Path, plan: ReadPlan) -> bool:
    """True while the file is the one the plan was taken from (same size and mtime)."""
    try:
        st = os.stat(p)
    except OSError:
        return False
    return st.st_size == plan.size and st.st_mtime_ns == plan.mtime_ns


def _plan_frame(plan: ReadPlan, fidx: int) -> _Frame:
    return _Frame(fidx, 0, None, plan.rows, plan.cols, np.array(plan.ipp), np.array(plan.iop),
                  np.array(plan.spacing), plan.slope, plan.intercept, plan.tkey, plan.tpi, plan.echo)


def _plan_pixels(p: Path, plan: ReadPlan) -> np.ndarray:
    """The planned file's stored values, shape (1, rows, cols)."""
    from ingest.dicomlite import native_pixels

    n = plan.rows * plan.cols * (plan.bits // 8)
    try:
        with open(p, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size != plan.size or st.st_mtime_ns != plan.mtime_ns:
                raise SeriesError(f"{p}: the file changed while its series was being read: ingest it again")
            buf = os.pread(fh.fileno(), n, plan.offset)
    except OSError as exc:
        raise SeriesError(f"{p}: cannot read file ({exc.strerror or exc})") from None
    if len(buf) < n:
        raise SeriesError(f"{p}: pixel data shorter than its header says ({len(buf)} of {n} bytes)")
    return native_pixels(buf, 0, plan.rows, plan.cols, plan.bits, plan.stored, plan.signed)[None]


# --------------------------------------------------------------------------- read_series

def _bare_dataset(fp) -> bool:
    """Whether a file without the 128-byte preamble and "DICM" starts like a DICOM data set: its
    first element in the file meta (0002) or identifying (0008) group, little endian. Older PACS
    exports write such files; dcm2niix and ``dcmread(force=True)`` read them."""
    if hasattr(fp, "seek"):
        fp.seek(0)
        head = fp.read(4)
    else:
        with open(fp, "rb") as fh:
            head = fh.read(4)
    return _starts_a_dataset(head)


def _starts_a_dataset(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack("<HH", head[:4])[0] in (0x0002, 0x0008)


def looks_like_dicom(path, head: bytes | None = None) -> bool:
    """Whether a file starts as DICOM: the "DICM" prefix after the preamble, or a bare data set
    (see :func:`_bare_dataset`). A sniff of a few bytes, not a parse; ``head``: the file's
    first bytes (132 or more, or all of it) when they are already read."""
    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(132)
    return head[128:132] == b"DICM" or _starts_a_dataset(head)


# pydicom's validation warnings quote the offending header value (a UID with an MRN in it, a
# malformed name), and they would reach stderr and CI logs; ingest reports what it cannot use in
# the manifest instead. pydicom is imported only when a file needs it (plain classic files are
# read without it), so the setting is applied on each read through it, inside quiet_reads().
_quiet = 0
_quiet_lock = threading.Lock()  # serve reads uploads in threads side by side


@contextlib.contextmanager
def quiet_reads():
    """pydicom quiet for the reads inside (validation off, its warnings dropped); the process's
    own settings are as they were afterwards, whether or not pydicom was imported meanwhile."""
    global _quiet
    was = sys.modules.get("pydicom.config")
    saved = was.settings._reading_validation_mode if was else None  # None: pydicom's default
    with _quiet_lock:
        _quiet += 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            yield
    finally:
        with _quiet_lock:
            _quiet -= 1
            config = sys.modules.get("pydicom.config")
            if config is not None and not _quiet:
                config.settings._reading_validation_mode = saved


def quiet_process() -> None:
    """quiet_reads() for the rest of the process: for processes whose pydicom reads are all
    ingest's (its worker processes, serve's replicas, where requests run in threads and a
    per-call context would restore one request's settings in the middle of another's)."""
    global _quiet
    with _quiet_lock:
        _quiet += 1
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def dcmread_any(fp, **kw):
    """``pydicom.dcmread``, which also takes a bare data set (see :func:`_bare_dataset`); anything
    else without the DICM prefix still raises InvalidDicomError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if _quiet:
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    try:
        ds = pydicom.dcmread(fp, force=False, **kw)
    except InvalidDicomError:
        if not _bare_dataset(fp):
            raise
        if hasattr(fp, "seek"):
            fp.seek(0)
        ds = pydicom.dcmread(fp, force=True, **kw)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta and getattr(ds, "original_encoding", None):
        # a bare data set, or a DICM file whose meta group lacks it: the encoding pydicom found is
        # the transfer syntax (native: nothing declares a compressed one); the decoders need it named
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                  pydicom.uid.ExplicitVRLittleEndian if little else
                                  pydicom.uid.ExplicitVRBigEndian)
    return ds


def _read_file(p: Path):
    from ingest.dicomlite import read_lite

    ds = read_lite(p)  # healthy classic files; everything else through pydicom
    if ds is not None:
        return ds
    from pydicom.errors import InvalidDicomError

    try:
        return dcmread_any(p)
    except FileNotFoundError:
        raise SeriesError(f"{p}: file not found") from None
    except InvalidDicomError:
        raise SeriesError(f"{p}: not a DICOM file (no 'DICM' signature)") from None
    except Exception as exc:  # noqa: BLE001
        raise SeriesError(f"{p}: unreadable DICOM file ({exc.__class__.__name__}: {exc})") from None


def _pixel_bytes(ds) -> bytes | None:
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        v = ds.get(kw)
        if v is not None:
            return bytes(v)
    return None


def _dataset(dsets: list, plist: list[Path], i: int):
    """The dataset of file i, parsed now if only its plan was kept."""
    if isinstance(dsets[i], ReadPlan):
        dsets[i] = _read_file(plist[i])
    return dsets[i]


def read_series(paths, infos=None, frame_type: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The files of ONE series -> (array float32, affine_lps, meta).

    ``array`` is ``(Z, Y, X)``, or ``(T, Z, Y, X)`` when every slice position holds
    T > 1 images (volumes in acquisition order: temporal position, acquisition
    number, acquisition time, instance number). A colour series (RGB, YBR or palette
    colour) gains a trailing RGB axis, ``(Z, Y, X, 3)`` or ``(T, Z, Y, X, 3)``, and
    ``meta["samples_per_pixel"] == 3``.  Raises :class:`SeriesError` (one
    line, naming the file or folder) for anything that does not make one regular
    grid: mixed orientation / matrix / pixel spacing, duplicated or missing slices,
    uneven spacing, incomplete volumes, missing or short pixel data, undecodable
    transfer syntaxes.

    ``infos``, optional: the :class:`ingest.series.FileInfo` of these files from
    :func:`ingest.series.scan`. A file whose info carries a :class:`ReadPlan` and that has
    not changed since is not parsed again (the result is the same either way).

    ``frame_type``, optional: for enhanced objects whose frames are of several kinds (a
    Philips B0 map holds magnitude and field-map frames, FrameType ``...\\M`` and
    ``...\\FIELD_MAP``), the FrameType (values joined by ``\\``) of the frames to read.
    Such a series read without it is a :class:`SeriesError` that lists the kinds: stacking
    them as volumes of one 4-D array would pass a field map off as a second time point.
    """
    if isinstance(paths, (str, Path)):  # one file, or a folder holding one series
        paths = sorted(p for p in Path(paths).iterdir() if p.is_file()) if Path(paths).is_dir() else [paths]
    plist = sorted({Path(p) for p in paths}, key=str)
    if not plist:
        raise SeriesError("(no files): read_series needs the files of one series, got none")
    where = _where(plist)

    plans = {Path(fi.path): fi.plan for fi in infos or () if getattr(fi, "plan", None) is not None}
    # per file: its dataset, or its ReadPlan until the dataset is needed
    dsets, kinds, frames, ts_list = [], set(), [], []
    components: dict[str, Path] = {}  # classic files: component -> its first file
    reversed_rows: dict[bool, Path] = {}  # classic files: rows stored reversed? -> its first file
    colours: dict[str, Path] = {}  # colour model ("" for greyscale) -> its first file
    for fidx, p in enumerate(plist):
        plan = plans.get(p)
        if plan is not None and plan_is_current(p, plan):
            dsets.append(plan)
            kinds.add("classic")
            frames.append(_plan_frame(plan, fidx))
            ts_list.append(plan.transfer_syntax)
            components.setdefault(plan.component, p)
            reversed_rows.setdefault(plan.rows_reversed, p)
            colours.setdefault("", p)   # the fast path reads greyscale files only
            continue
        ds = _read_file(p)
        ts = _ts_of(ds)
        try:
            _check_pixel_data(ds, p, ts)
            fr, kind = _frames_of(ds, p, fidx)
        except (NotImplementedError, ValueError, KeyError, struct.error, UnicodeDecodeError, OverflowError) as exc:
            # pydicom converts values when they are first read: a bad VR or value surfaces here
            if isinstance(exc, SeriesError):
                raise
            raise SeriesError(f"{p}: unreadable DICOM header ({exc.__class__.__name__}: {exc})") from None
        dsets.append(ds)
        kinds.add(kind)
        frames.extend(fr)
        ts_list.append(str(ts))
        colours.setdefault(is_colour(ds, p), p)
        if kind == "classic":
            components.setdefault(complex_component(ds), p)
            reversed_rows.setdefault(ge_pepolar_reversed(ds), p)
    if len(kinds) > 1:
        raise SeriesError(f"{where}: mixes {' and '.join(sorted(kinds))} images: not one series "
                          "(a classic and an enhanced export of one acquisition?)")
    kind = kinds.pop()
    if len(components) > 1:
        # a GE series can hold magnitude, phase, real and imaginary images under one UID and one
        # ImageType: stacked, they would pass as four time points of one volume
        named = ", ".join(f"{c or 'unstated'} ({f.name})" for c, f in sorted(components.items()))
        raise SeriesError(f"{where}: holds images of {len(components)} complex components ({named}): "
                          "one volume per component (ingest.group_series splits them)")
    if len(reversed_rows) > 1:
        raise SeriesError(f"{where}: holds GE epi_pepolar volumes of both phase-encoding polarities "
                          f"(reversed: {reversed_rows[True].name}, forward: {reversed_rows[False].name}): one "
                          "series per polarity, as dcm2niix writes them (ingest.group_series splits them)")
    if len(colours) > 1:
        named = ", ".join(f"{c or 'greyscale'} ({f.name})" for c, f in sorted(colours.items()))
        raise SeriesError(f"{where}: mixes colour and greyscale images ({named}): not one volume")
    colour = bool(next(iter(colours)))
    flip_rows = reversed_rows.get(True) is not None
    frames = _select_frame_type(frames, frame_type, plist)
    _check_one_echo(frames, plist, kind, where)

    _check_consistency(frames, plist, kind)
    f0 = frames[0]
    row_dir = _unit(f0.iop[:3], "row direction cosine", plist[f0.file])
    col_dir = _unit(f0.iop[3:], "column direction cosine", plist[f0.file])
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise SeriesError(f"{plist[f0.file]}: row and column cosines are not orthogonal "
                          f"(cos = {float(row_dir @ col_dir):.3g}): corrupt ImageOrientationPatient")
    normal = np.cross(row_dir, col_dir)

    clusters, d = _cluster_positions(frames, normal, plist)
    n_vol = _check_counts(clusters, frames, plist, kind,
                          pixels_of=lambda i: _pixel_bytes(_dataset(dsets, plist, i)))
    # volume t = the t-th image (in acquisition order) at every position
    for t in range(n_vol):
        tpis = {frames[c[t]].tpi for c in clusters}
        if n_vol > 1 and None not in tpis and len(tpis) > 1:
            # name an image of the odd one out: the value fewest slices of this volume carry
            odd = min(sorted(tpis), key=lambda v: sum(frames[c[t]].tpi == v for c in clusters))
            first = next(c[t] for c in clusters if frames[c[t]].tpi == odd)
            raise SeriesError(
                f"{where}: volume {t + 1} would mix temporal positions {sorted(tpis)}: the volumes do not "
                f"cover the same slice positions (missing or extra files; {_frame_name(frames[first], plist, kind)} "
                f"is at temporal position {odd})")
    reps = [frames[c[0]] for c in clusters]
    z = len(clusters)
    if z > 1:
        step = _check_spacing(reps, np.array([d[c[0]] for c in clusters]), plist, kind, where)
    else:
        ds0 = _dataset(dsets, plist, f0.file)
        sp = _f(_find(ds0, "SpacingBetweenSlices")) or _f(_find(ds0, "SliceThickness")) or 1.0
        step = normal * abs(sp)

    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * float(f0.spacing[0])
    affine[:3, 2] = row_dir * float(f0.spacing[1])
    affine[:3, 3] = reps[0].ipp

    first = frames[clusters[0][0]]
    shape = (n_vol, z, f0.rows, f0.cols) if n_vol > 1 else (z, f0.rows, f0.cols)
    meta = _meta(_dataset(dsets, plist, first.file), frames, kind, ts_list, len(plist), shape, step, z)
    if colour:
        # RGB on a trailing axis, as NIfTI's RGB24 (and dcm2niix) hold it: (Z, Y, X, 3)
        meta.update(samples_per_pixel=3, photometric_interpretation="RGB",
                    stored_photometric_interpretation=next(iter(colours)))
    if frame_type is not None:  # the file's ImageType speaks for all its frames ("MIXED")
        meta["image_type"] = f0.ftype.split("\\")
    if components and next(iter(components)):
        meta["complex_component"] = next(iter(components))
    if flip_rows:
        meta["rows_reversed_by_scanner"] = True  # stored bottom-up by GE epi_pepolar; read back in header order

    # decode file by file, placing each frame at (t, z)
    out = np.empty((n_vol, z, f0.rows, f0.cols) + ((3,) if colour else ()), dtype=np.float32)
    place: dict[int, list[tuple[int, int, _Frame]]] = {}
    for zi, c in enumerate(clusters):
        for t, i in enumerate(c):
            place.setdefault(frames[i].file, []).append((t, zi, frames[i]))
    for fidx in sorted(place):
        if isinstance(dsets[fidx], ReadPlan):
            arr = _plan_pixels(plist[fidx], dsets[fidx])
        else:
            arr = _decode(dsets[fidx], plist[fidx], ts_list[fidx])
        dsets[fidx] = None  # drop the pixel bytes as we go
        for t, zi, fr in place[fidx]:
            img = arr[fr.frame]
            if fr.tile is not None:
                r0, c0 = fr.tile
                img = img[r0:r0 + fr.rows, c0:c0 + fr.cols]
            if flip_rows:
                img = img[::-1]
            if colour or (fr.slope == 1.0 and fr.intercept == 0.0):   # the Modality LUT is greyscale only
                out[t, zi] = img
            else:
                out[t, zi] = img.astype(np.float64) * fr.slope + fr.intercept
        del arr
    return (out[0] if n_vol == 1 else out), affine, meta
