"""Write (and read back the geometry of) single-frame MR DICOM series.

The phantom simulator uses this module to store each simulated series as one
MR Image Storage file per slice, with headers shaped like those of the real
scanners of the two sites (Siemens-like and GE-like).

Geometry convention (project contract)
--------------------------------------
``affine_lps`` is a 4x4 float64 matrix mapping the voxel index ``(z, y, x)`` of
``volume[z, y, x]`` to DICOM patient coordinates (LPS, mm)::

    lps = affine_lps @ [z, y, x, 1]

* column 2 (x, column index within a slice) = row direction cosine * column spacing
* column 1 (y, row index)                    = column direction cosine * row spacing
* column 0 (z, slice index)                  = slice step (normal * spacing, either sign)
* column 3                                   = ImagePositionPatient of slice z = 0

so ``ImageOrientationPatient = [unit(A[:3, 2]), unit(A[:3, 1])]``,
``PixelSpacing = [|A[:3, 1]|, |A[:3, 2]|]`` and the IPP of slice k is
``A[:3, 3] + k * A[:3, 0]``.

Rounding
--------
DS values hold at most 16 characters.  Geometry values are written with the
shortest exact ``repr`` when it fits, otherwise in fixed point with as many
decimals as fit (>= 11 for coordinates below 1000 mm, 13-14 for direction
cosines), so the headers lose < 1e-10 mm.  :func:`round_affine_for_dicom`
returns the affine exactly as :func:`affine_from_datasets` reads it back from
those headers; simulate on that affine.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "MR_IMAGE_STORAGE",
    "GAMMA_BAR_MHZ_PER_T",
    "dicom_uid",
    "format_ds",
    "geometry_from_affine",
    "slice_positions",
    "round_affine_for_dicom",
    "affine_from_datasets",
    "read_series",
    "write_series",
]

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
GAMMA_BAR_MHZ_PER_T = 42.577478518  # 1H gyromagnetic ratio / 2 pi, MHz/T
IMPLEMENTATION_VERSION_NAME = "QSNET_0_1"

_TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
}
_INSTANCE_ORDERS = ("inferior_to_superior", "superior_to_inferior")

# Geometry checks on the affine (DICOM single-frame stacks describe an
# orthogonal grid with the slice step along the slice normal).
_ORTHO_TOL = 1e-6  # |cos| between axes, i.e. ~1e-6 rad
_SPACING_TOL_MM = 1e-3  # |slice step| vs thickness + gap

# Defined terms of Rescale Type (0028,1054), PS3.3 C.11.1.1.2.
_RESCALE_TYPES = {
    "OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT",
}
# A few UCUM units of quantitative maps, for Measurement Units Code Sequence.
_UCUM_MEANINGS = {
    "ms": "millisecond",
    "s": "second",
    "Hz": "hertz",
    "/s": "per second",
    "1/s": "per second",
    "ppm": "parts per million",
    "%": "percent",
    "1": "no units",
}


# --------------------------------------------------------------------------- UIDs


def dicom_uid(*parts: str) -> str:
    """Deterministic UID ``2.25.<int of sha256('|'.join(parts))[:16]>`` (<= 44 chars)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


IMPLEMENTATION_CLASS_UID = dicom_uid("qsnet", "implementation")


# --------------------------------------------------------------------- DS values


def format_ds(value: float, *, fixed: bool = False) -> str:
    """Format a number as a DS string of at most 16 characters.

    The shortest round-trip ``repr`` is used when it fits (so 0.94 stays
    ``"0.94"`` and reads back bit-exact).  Otherwise, with ``fixed=True``
    (geometry: absolute precision matters), fixed point with as many decimals as
    fit; numbers too small for that underflow to ``"0"`` only below 5e-15.
    Without ``fixed``, pydicom's ``format_number_as_ds`` (keeps relative
    precision, may use an exponent).
    """
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"DS value must be finite, got {value!r}")
    if v == 0.0:
        return "0"
    r = repr(v)
    if r.endswith(".0"):
        r = r[:-2]
    if len(r) <= 16 and "e" not in r and "E" not in r:
        return r
    if fixed or abs(v) >= 1e-4:
        int_digits = len(str(int(abs(v))))
        decimals = 16 - (1 if v < 0 else 0) - int_digits - 1
        while decimals >= 1:
            s = f"{v:.{decimals}f}"
            if len(s) <= 16:
                s = s.rstrip("0").rstrip(".")
                if s in ("", "-", "0", "-0"):
                    return "0"
                return s
            decimals -= 1  # rounding carried into a new integer digit
    return format_number_as_ds(v)


def _ds_float(value: float, *, fixed: bool = True) -> float:
    """The float a reader gets back from the DS string written for ``value``."""
    return float(format_ds(value, fixed=fixed))


# ---------------------------------------------------------------------- geometry


def _dot(a: Any, b: Any) -> float:
    """a . b, the same to the last bit on every CPU: numpy's dot goes through a BLAS kernel
    chosen for the CPU (FMA or not, its own summation order), and the header values below
    are printed to 16 characters, where that last bit can show (slice locations are sums of
    products of ~100 mm that cancel). Python's float products and fsum do not vary."""
    return math.fsum(float(x) * float(y) for x, y in zip(a, b))


def _norm(v: Any) -> float:
    return math.sqrt(_dot(v, v))


def _unit(v: np.ndarray) -> np.ndarray:
    n = _norm(v)
    if not n > 0:
        raise ValueError("affine has a zero-length axis")
    return v / n


def _check_affine(affine_lps: Any) -> np.ndarray:
    a = np.asarray(affine_lps, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine_lps must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("affine_lps has non-finite entries")
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0], atol=0.0, rtol=0.0):
        raise ValueError(f"affine_lps last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    step, col_vec, row_vec = a[:3, 0], a[:3, 1], a[:3, 2]
    for name, v in (("slice (column 0)", step), ("row index (column 1)", col_vec),
                    ("column index (column 2)", row_vec)):
        if not np.linalg.norm(v) > 0:
            raise ValueError(f"affine_lps {name} axis has zero length")
    r, c, s = _unit(row_vec), _unit(col_vec), _unit(step)
    if abs(float(r @ c)) > _ORTHO_TOL:
        raise ValueError(
            f"affine_lps in-plane axes are not orthogonal (cos = {float(r @ c):.3g}); "
            "DICOM ImageOrientationPatient needs orthogonal row/column cosines")
    n = np.cross(r, c)
    if np.linalg.norm(np.cross(s, n)) > _ORTHO_TOL:
        raise ValueError(
            "affine_lps slice step is not along the slice normal (sheared / gantry-tilted "
            f"grid; sin = {float(np.linalg.norm(np.cross(s, n))):.3g}); a single-frame DICOM "
            "stack of this project must have the slice step along row x column cosine")
    return a


def slice_positions(affine_lps: Any, n_slices: int) -> np.ndarray:
    """(n, 3) ImagePositionPatient of slices 0..n-1 (unrounded floats)."""
    a = np.asarray(affine_lps, dtype=np.float64)
    k = np.arange(int(n_slices), dtype=np.float64)[:, None]
    return a[:3, 3][None, :] + k * a[:3, 0][None, :]


def geometry_from_affine(affine_lps: Any) -> dict:
    """DICOM geometry described by ``affine_lps`` (unrounded floats).

    Keys: ``iop`` (6 floats: row cosine then column cosine), ``pixel_spacing``
    ([row spacing, column spacing] mm), ``normal`` (row x column cosine),
    ``slice_step`` (3-vector, column 0), ``spacing_between_slices`` (|step|, mm,
    positive), ``slice_direction`` (+1 when the step is along +normal, else -1),
    ``origin`` (IPP of slice 0) and ``slice_positions`` (callable n -> (n, 3) IPPs).
    """
    a = _check_affine(affine_lps)
    step, col_vec, row_vec = a[:3, 0], a[:3, 1], a[:3, 2]
    r, c = _unit(row_vec), _unit(col_vec)
    n = np.cross(r, c)
    return {
        "iop": [float(x) for x in np.concatenate([r, c])],
        "pixel_spacing": [_norm(col_vec), _norm(row_vec)],
        "normal": [float(x) for x in n],
        "slice_step": [float(x) for x in step],
        "spacing_between_slices": float(np.linalg.norm(step)),
        "slice_direction": 1 if float(step @ n) > 0 else -1,
        "origin": [float(x) for x in a[:3, 3]],
        "slice_positions": functools.partial(slice_positions, a),
    }


def _header_geometry(a: np.ndarray, n_slices: int) -> dict:
    """DS strings of the geometry (what write_series puts in the headers)."""
    g = geometry_from_affine(a)
    ipps = slice_positions(a, n_slices)
    normal = np.asarray(g["normal"])
    return {
        "iop": [format_ds(v, fixed=True) for v in g["iop"]],
        "pixel_spacing": [format_ds(v, fixed=True) for v in g["pixel_spacing"]],
        "ipp": [[format_ds(v, fixed=True) for v in p] for p in ipps],
        "slice_location": [format_ds(_dot(p, normal), fixed=True) for p in ipps],
    }


def _affine_from_parsed(iop: Sequence[float], pixel_spacing: Sequence[float],
                        ipp0: Sequence[float], step: Sequence[float]) -> np.ndarray:
    iop = np.asarray(iop, dtype=np.float64)
    r, c = _unit(iop[:3]), _unit(iop[3:])
    a = np.eye(4)
    a[:3, 0] = np.asarray(step, dtype=np.float64)
    a[:3, 1] = c * float(pixel_spacing[0])
    a[:3, 2] = r * float(pixel_spacing[1])
    a[:3, 3] = np.asarray(ipp0, dtype=np.float64)
    return a


def round_affine_for_dicom(affine_lps: Any) -> np.ndarray:
    """The affine as it reads back from the headers write_series writes.

    Direction cosines, pixel spacings and slice positions go through the same DS
    formatting as the files; the cosines are re-normalised as
    :func:`affine_from_datasets` does.  The slice step is the difference of the
    formatted positions of slices 0 and 1 (a reader of n > 1 slices gets
    (IPP[n-1] - IPP[0]) / (n-1), which differs by < 1e-10 mm).  For a single
    slice a reader gets +normal * SpacingBetweenSlices instead.
    """
    a = _check_affine(affine_lps)
    h = _header_geometry(a, 2)
    ipp = np.array([[float(v) for v in p] for p in h["ipp"]])
    return _affine_from_parsed([float(v) for v in h["iop"]],
                               [float(v) for v in h["pixel_spacing"]],
                               ipp[0], ipp[1] - ipp[0])


def affine_from_datasets(datasets: Iterable[Any], *, sort: bool = True,
                         tol_mm: float = 1e-3) -> np.ndarray:
    """Affine (project convention) of one stack of single-frame slices.

    ``datasets``: pydicom Datasets or file paths (read without pixels).  With
    ``sort=True`` the slices are ordered by position along the slice normal
    (row cosine x column cosine), ascending, i.e. z = 0 is the slice furthest
    towards -normal and column 0 points along +normal.  With ``sort=False`` the
    given order is the z order.  Raises ValueError when the slices do not share
    one orientation / pixel spacing or are not equally spaced (e.g. several
    volumes of a 4-D series mixed together).  A single slice gets
    +normal * SpacingBetweenSlices (else SliceThickness, else 1 mm) as step.
    """
    dss = [d if isinstance(d, Dataset) else pydicom.dcmread(d, stop_before_pixels=True)
           for d in datasets]
    if not dss:
        raise ValueError("affine_from_datasets needs at least one dataset")
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    ps = [float(v) for v in dss[0].PixelSpacing]
    for d in dss[1:]:
        if not np.allclose([float(v) for v in d.ImageOrientationPatient], iop, atol=1e-4):
            raise ValueError("slices differ in ImageOrientationPatient: not one stack")
        if not np.allclose([float(v) for v in d.PixelSpacing], ps, atol=1e-4):
            raise ValueError("slices differ in PixelSpacing: not one stack")
    normal = np.cross(_unit(iop[:3]), _unit(iop[3:]))
    ipps = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    if sort:
        ipps = ipps[np.argsort(ipps @ normal, kind="stable")]
    n = len(ipps)
    if n > 1:
        step = (ipps[-1] - ipps[0]) / (n - 1)
        expected = ipps[0][None, :] + np.arange(n)[:, None] * step[None, :]
        dev = float(np.max(np.linalg.norm(ipps - expected, axis=1)))
        if dev > tol_mm or not np.linalg.norm(step) > 0:
            raise ValueError(
                f"slice positions are not equally spaced (max deviation {dev:.4g} mm, "
                f"mean step {np.linalg.norm(step):.4g} mm): repeated or missing slices?")
    else:
        d0 = dss[0]
        spacing = None
        for kw in ("SpacingBetweenSlices", "SliceThickness"):
            v = d0.get(kw)
            if v not in (None, "") and float(v) > 0:
                spacing = float(v)
                break
        step = normal * (spacing if spacing is not None else 1.0)
    return _affine_from_parsed(iop, ps, ipps[0], step)


def read_series(src: Any, *, sort: bool = True) -> tuple[np.ndarray, np.ndarray, list[Dataset]]:
    """Read a folder (every file in it) or a list of files as one stack.

    Returns ``(stored_volume[z, y, x], affine_lps, datasets_in_z_order)``;
    stored values, no rescale applied (see the datasets for slope/intercept).
    """
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        paths = sorted(p for p in Path(src).iterdir() if p.is_file())
    else:
        paths = [Path(p) for p in src]
    dss = [pydicom.dcmread(p) for p in paths]
    if sort and dss:
        iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
        normal = np.cross(_unit(iop[:3]), _unit(iop[3:]))
        key = [float(np.array([float(v) for v in d.ImagePositionPatient]) @ normal) for d in dss]
        dss = [dss[i] for i in np.argsort(key, kind="stable")]
    affine = affine_from_datasets(dss, sort=False)
    volume = np.stack([d.pixel_array for d in dss])
    return volume, affine, dss


# ---------------------------------------------------------------------- writing

_REQUIRED_SERIES = ("description", "series_uid", "series_number", "thickness")
_REQUIRED_EXAM = (
    "manufacturer", "model", "field_strength", "patient_name", "patient_id",
    "study_date", "study_time", "study_uid", "frame_of_reference_uid", "uid_seed",
)


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [s for s in v.split("\\")] if v else []
    return [str(s) for s in v]


def _multi(v: Any) -> Any:
    """Value for a possibly multi-valued string element (backslash = separator)."""
    items = _as_list(v)
    if not items:
        return ""
    return items if len(items) > 1 else items[0]


def _is_ge(manufacturer: str) -> bool:
    return manufacturer.strip().upper().startswith("GE")


def _window(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [0.5, 99.5])
    lo, hi = float(lo), float(hi)
    width = max(hi - lo, 1.0)
    center = (hi + lo) / 2.0
    return round(center, 3), round(width, 3)


def _instance_order(a: np.ndarray, n: int, order: str) -> np.ndarray:
    """Slice indices (z) in instance-number order."""
    step = a[:3, 0]
    if abs(step[2]) > 1e-9 * np.linalg.norm(step):
        key = np.arange(n) * step[2]  # S coordinate (up to a constant) of each slice
    else:  # no S component (sagittal / coronal): order along the dominant axis
        axis = int(np.argmax(np.abs(step)))
        key = np.arange(n) * step[axis]
    if order == "inferior_to_superior":
        return np.argsort(key, kind="stable")
    return np.argsort(-key, kind="stable")


def _scan_options(series: dict) -> Any:
    if "scan_options" in series:
        return _multi(series["scan_options"])
    if "IR" in _as_list(series.get("scanning_sequence")):
        return "IR"
    return ""


def _acquisition_matrix(series: dict, phase_dir: str, rows: int, cols: int) -> list[int]:
    m = series.get("acq_matrix")
    if m is None:
        freq, phase = cols, rows
    elif isinstance(m, (list, tuple)):
        freq, phase = int(m[0]), int(m[-1])
    else:
        freq = phase = int(m)
    if phase_dir == "ROW":
        return [0, freq, phase, 0]
    return [freq, 0, 0, phase]


def _rwv_item(units: str, label: str, explanation: str, slope: float, intercept: float,
              first: int, last: int, signed: bool) -> Dataset:
    code = Dataset()
    code.CodeValue = units
    code.CodingSchemeDesignator = "UCUM"
    code.CodeMeaning = _UCUM_MEANINGS.get(units, units)
    item = Dataset()
    item.LUTExplanation = explanation[:64]
    item.MeasurementUnitsCodeSequence = DicomSequence([code])
    item.LUTLabel = label[:16]
    vr = "SS" if signed else "US"
    item.add_new(0x00409216, vr, int(first))  # RealWorldValueFirstValueMapped
    item.add_new(0x00409211, vr, int(last))  # RealWorldValueLastValueMapped
    item.RealWorldValueIntercept = float(intercept)
    item.RealWorldValueSlope = float(slope)
    return item


def write_series(out_dir: Path, volume: np.ndarray, affine_lps: np.ndarray, series: dict,
                 exam: dict, *, rescale_slope: float = 1.0, rescale_intercept: float = 0.0,
                 rescale_type: str | None = None, instance_order: str = "inferior_to_superior",
                 transfer_syntax: str = "explicit", bits_stored: int | None = None) -> list[Path]:
    """Write ``volume[z, y, x]`` (stored values) as one MR Image Storage file per slice.

    Files ``IM0001.dcm`` ... in ``out_dir`` (created; must not exist or be
    empty); returns their paths in instance order.  ``instance_order``
    ``"inferior_to_superior"`` gives InstanceNumber 1 to the slice with the
    smallest S (LPS z) coordinate, ``"superior_to_inferior"`` the reverse.
    ``transfer_syntax``: ``"explicit"`` or ``"implicit"`` VR little endian.
    ``bits_stored``: None = 12 for uint16 data below 4096 on non-GE scanners,
    else 16; an explicit value must hold the data.  Physical value =
    stored * rescale_slope + rescale_intercept.
    """
    out_dir = Path(out_dir)
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"volume must be a non-empty 3-D (Z, Y, X) array, got shape {vol.shape}")
    if vol.dtype not in (np.dtype(np.uint16), np.dtype(np.int16)):
        raise ValueError(f"volume must be uint16 or int16 stored values, got dtype {vol.dtype}")
    if vol.shape[1] > 65535 or vol.shape[2] > 65535:
        raise ValueError(f"slice size {vol.shape[1:]} exceeds DICOM Rows/Columns limit")
    a = _check_affine(affine_lps)
    if instance_order not in _INSTANCE_ORDERS:
        raise ValueError(f"instance_order must be one of {_INSTANCE_ORDERS}, got {instance_order!r}")
    if transfer_syntax not in _TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {tuple(_TRANSFER_SYNTAXES)}, "
                         f"got {transfer_syntax!r}")
    missing = [k for k in _REQUIRED_SERIES if k not in series]
    if missing:
        raise ValueError(f"series dict lacks {missing}")
    missing = [k for k in _REQUIRED_EXAM if k not in exam]
    if missing:
        raise ValueError(f"exam dict lacks {missing}")
    slope, intercept = float(rescale_slope), float(rescale_intercept)
    if not (math.isfinite(slope) and slope != 0.0 and math.isfinite(intercept)):
        raise ValueError(f"invalid rescale slope/intercept {rescale_slope!r}/{rescale_intercept!r}")

    thickness = float(series["thickness"])
    gap = float(series.get("gap", 0.0) or 0.0)
    spacing_between = round(thickness + gap, 6)
    step_len = float(np.linalg.norm(a[:3, 0]))
    if abs(step_len - spacing_between) > _SPACING_TOL_MM:
        raise ValueError(
            f"affine slice step {step_len:.6g} mm disagrees with thickness + gap = "
            f"{spacing_between:.6g} mm (SpacingBetweenSlices)")

    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"out_dir {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise ValueError(f"out_dir {out_dir} is not empty")

    n_slices, rows, cols = (int(s) for s in vol.shape)
    signed = vol.dtype == np.dtype(np.int16)
    manufacturer = str(exam["manufacturer"])
    ge = _is_ge(manufacturer)
    vmin, vmax = int(vol.min()), int(vol.max())
    if bits_stored is None:
        bits = 12 if (not signed and not ge and vmax < 4096) else 16
    else:
        bits = int(bits_stored)
        if not 8 <= bits <= 16:
            raise ValueError(f"bits_stored must be in 8..16, got {bits}")
        lo_ok = -(1 << (bits - 1)) if signed else 0
        hi_ok = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        if vmin < lo_ok or vmax > hi_ok:
            raise ValueError(f"data range [{vmin}, {vmax}] does not fit bits_stored={bits}")

    geom = _header_geometry(a, n_slices)
    order = _instance_order(a, n_slices, instance_order)
    phys = vol.astype(np.float64) * slope + intercept
    wc, ww = _window(phys)
    units = series.get("units")
    write_rescale = slope != 1.0 or intercept != 0.0 or rescale_type is not None or bool(units)
    if rescale_type is None or str(rescale_type).upper() not in _RESCALE_TYPES:
        rtype = "US"  # unspecified; the unit goes to DerivationDescription / RWV mapping
        unit_text = units or (rescale_type if rescale_type else None)
    else:
        rtype = str(rescale_type).upper()
        unit_text = units
    field = float(exam["field_strength"])
    phase_dir = str(series.get("phase_encoding_direction", "COL" if ge else "ROW")).upper()
    acq_time = str(series.get("acquisition_time", exam["study_time"]))
    study_date = str(exam["study_date"])
    physicians = _as_list(exam.get("physicians"))
    ts_uid = _TRANSFER_SYNTAXES[transfer_syntax]

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for inst_idx, z in enumerate(order):
        instance = inst_idx + 1
        sop_uid = dicom_uid(str(exam["uid_seed"]), str(series["series_uid"]), str(instance))

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ts_uid
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = _as_list(series.get("image_type")) or ["ORIGINAL", "PRIMARY"]
        ds.InstanceCreationDate = study_date
        ds.InstanceCreationTime = acq_time
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.AcquisitionDate = study_date
        ds.ContentDate = study_date
        ds.StudyTime = str(exam["study_time"])
        ds.SeriesTime = acq_time
        ds.AcquisitionTime = acq_time
        ds.ContentTime = acq_time
        ds.AccessionNumber = str(exam.get("accession", ""))
        ds.Modality = "MR"
        ds.Manufacturer = manufacturer
        ds.InstitutionName = str(exam.get("institution", ""))
        ds.InstitutionAddress = str(exam.get("address", ""))
        ds.ReferringPhysicianName = physicians[0] if physicians else ""
        ds.StationName = str(exam.get("station_name", ""))
        ds.StudyDescription = str(exam.get("study_description", ""))
        ds.SeriesDescription = str(series["description"])
        if write_rescale and unit_text:
            what = (f"{str(series['output']).upper()} map" if series.get("output")
                    else str(series["description"]))
            ds.DerivationDescription = f"{what}, {unit_text}"
        ds.PerformingPhysicianName = physicians[1] if len(physicians) > 1 else (
            physicians[0] if physicians else "")
        ds.OperatorsName = _multi(exam.get("operators", ""))
        ds.ManufacturerModelName = str(exam["model"])
        ds.PatientName = str(exam["patient_name"])
        ds.PatientID = str(exam["patient_id"])
        ds.PatientBirthDate = str(exam.get("birth_date", ""))
        ds.PatientSex = str(exam.get("sex", ""))
        ds.PatientAge = str(exam.get("age", ""))
        if exam.get("height") is not None:
            ds.PatientSize = format_ds(float(exam["height"]))
        if exam.get("weight") is not None:
            ds.PatientWeight = format_ds(float(exam["weight"]))
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = _multi(series.get("scanning_sequence", "RM"))
        ds.SequenceVariant = _multi(series.get("sequence_variant", "NONE"))
        ds.ScanOptions = _scan_options(series)
        ds.MRAcquisitionType = str(series.get("acq_type", "2D"))
        ds.SequenceName = str(series.get("sequence_name", ""))
        ds.AngioFlag = "N"
        ds.SliceThickness = format_ds(thickness)
        if series.get("tr") is not None:
            ds.RepetitionTime = format_ds(float(series["tr"]))
        if series.get("te") is not None:
            ds.EchoTime = format_ds(float(series["te"]))
        if series.get("ti") is not None:
            ds.InversionTime = format_ds(float(series["ti"]))
        ds.NumberOfAverages = format_ds(float(series.get("averages", 1)))
        ds.ImagingFrequency = format_ds(round(GAMMA_BAR_MHZ_PER_T * field, 6))
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = format_ds(field)
        ds.SpacingBetweenSlices = format_ds(spacing_between)
        percent_sampling = float(series.get("percent_sampling", 100.0))
        acq_m = _acquisition_matrix(series, phase_dir, rows, cols)
        phase_lines = max(acq_m[2], acq_m[3])
        ds.NumberOfPhaseEncodingSteps = int(round(phase_lines * percent_sampling / 100.0))
        ds.EchoTrainLength = int(series.get("etl", 1) or 1)
        ds.PercentSampling = format_ds(percent_sampling)
        ds.PercentPhaseFieldOfView = format_ds(float(series.get("percent_phase_fov", 100.0)))
        ds.PixelBandwidth = format_ds(float(series.get("pixel_bandwidth", 200.0)))
        ds.SoftwareVersions = _multi(exam.get("software_versions", ""))
        ds.ProtocolName = str(series.get("protocol", series["description"]))
        if series.get("fov") is not None and ge:
            ds.ReconstructionDiameter = format_ds(float(series["fov"]))
        ds.AcquisitionMatrix = acq_m
        ds.InPlanePhaseEncodingDirection = phase_dir
        if series.get("flip_angle") is not None:
            ds.FlipAngle = format_ds(float(series["flip_angle"]))
        ds.VariableFlipAngleFlag = "N"
        ds.PatientPosition = str(exam.get("patient_position", "HFS"))
        ds.StudyInstanceUID = str(exam["study_uid"])
        ds.SeriesInstanceUID = str(series["series_uid"])
        ds.StudyID = str(exam.get("study_id", ""))
        ds.SeriesNumber = int(series["series_number"])
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = geom["ipp"][z]
        ds.ImageOrientationPatient = geom["iop"]
        ds.FrameOfReferenceUID = str(exam["frame_of_reference_uid"])
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = geom["slice_location"][z]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = geom["pixel_spacing"]
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if signed else 0
        sl = vol[z]
        pix_vr = "SS" if signed else "US"
        ds.add_new(0x00280106, pix_vr, int(sl.min()))  # SmallestImagePixelValue
        ds.add_new(0x00280107, pix_vr, int(sl.max()))  # LargestImagePixelValue
        ds.WindowCenter = format_ds(wc)
        ds.WindowWidth = format_ds(ww)
        if write_rescale:
            ds.RescaleIntercept = format_ds(intercept)
            ds.RescaleSlope = format_ds(slope)
            ds.RescaleType = rtype
        if write_rescale and units:
            label = str(series.get("output", "")).upper() or "MAP"
            ds.RealWorldValueMappingSequence = DicomSequence([_rwv_item(
                str(units), label, f"{label} map, {units}", slope, intercept,
                vmin, vmax, signed)])
        if ge:
            acqu = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
            acqu.add_new(0x9C, "LO", str(series.get("sequence_name", ""))[:64])  # Pulse Seq Name
            acqu.add_new(0x9E, "LO", str(series.get("kind", "")).upper()[:64])  # Internal PSN
            parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
            parm.add_new(0x8A, "CS", phase_dir)  # Private In-Plane Phase Encoding Direction
        ds.PixelData = np.ascontiguousarray(sl, dtype="<i2" if signed else "<u2").tobytes()
        ds["PixelData"].VR = "OW"

        path = out_dir / f"IM{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
