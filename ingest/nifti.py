"""NIfTI in the project's conventions: arrays indexed (z, y, x), affines to patient LPS.

NIfTI itself is (x, y, z) and RAS. Kept apart from the phantom (whose anatomy module needs
scipy) so the ingest workers and the server load a .nii.gz with nibabel alone, and a plain file
(the phantom's ground truth) without it: nibabel imports pydicom when it is imported, 0.18 s in
each ingest worker of a tree whose DICOM never needs pydicom.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

__all__ = ["RAS_TO_LPS", "save_nifti", "nifti_forms", "load_nifti_zyx"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def save_nifti(path: Path, data_zyx: np.ndarray, affine_lps: np.ndarray, forms: dict | None = None) -> None:
    """A (z, y, x) array with its (z, y, x) -> LPS affine as a deterministic .nii.gz
    (NIfTI is (x, y, z) and RAS; the gzip header carries no timestamp or file name).

    The affine goes into both sform and qform as scanner space (code 1); a sheared affine
    (a tilted stack) into the sform only, the qform marked unknown (code 0). ``forms`` (see
    :func:`nifti_forms`, of a file on the same voxel grid in the same order) writes that
    file's own sform and qform with their codes instead: a result computed from an uploaded
    NIfTI keeps the upload's spaces (an aligned sform beside a scanner qform stays so)."""
    import io

    import nibabel as nib

    data = np.ascontiguousarray(np.asarray(data_zyx).transpose(2, 1, 0))
    img = nib.Nifti1Image(data, RAS_TO_LPS @ affine_lps[:, [2, 1, 0, 3]])
    img.header.set_xyzt_units("mm")
    if forms is None:
        # A qform is a rotation, voxel sizes and a shift: it cannot hold the shear of a tilted
        # stack (slice positions not along the slice normal, which read_series keeps exact).
        # Written anyway it would disagree with the sform by millimetres; unset (code 0), every
        # NIfTI reader takes the sform, which holds the affine exactly.
        img.set_qform(img.affine, code=0 if _sheared(img.affine) else 1)
        img.set_sform(img.affine, code=1)
    else:
        img.set_qform(forms["qform"], code=int(forms["qform_code"]))
        img.set_sform(forms["sform"], code=int(forms["sform_code"]))
    buf = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    raw = buf.getvalue()
    with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=6) as gz:
        gz.write(raw)


def _sheared(affine: np.ndarray, tol: float = 1e-6) -> bool:
    m = np.asarray(affine, float)[:3, :3]
    n = m / np.linalg.norm(m, axis=0)
    return bool(np.abs(n.T @ n - np.eye(3)).max() > tol)


def nifti_forms(path: Path) -> dict:
    """A NIfTI file's sform and qform (RAS, (x, y, z) index; None where its code is 0) and their
    codes. Both codes 0 means the header does not say where the voxels are in the patient:
    nibabel then makes an affine up from the voxel sizes alone."""
    import nibabel as nib

    hdr = nib.load(str(path)).header
    (s, sc), (q, qc) = hdr.get_sform(coded=True), hdr.get_qform(coded=True)
    return {"sform": s, "sform_code": int(sc), "qform": q, "qform_code": int(qc)}


def load_nifti_zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of save_nifti: (z, y, x) array and its (z, y, x) -> LPS affine."""
    plain = _plain_nifti(path)
    if plain is None:
        import nibabel as nib

        img = nib.load(str(path))
        plain = np.asarray(img.dataobj), img.affine
    data, affine = plain
    return np.ascontiguousarray(data.transpose(2, 1, 0)), RAS_TO_LPS @ affine[:, [2, 1, 0, 3]]


# NIfTI-1 datatype codes -> numpy, the ones a plain file may hold
_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}


def _plain_nifti(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The (x, y, z) data and RAS affine of a single-file NIfTI-1 (gzipped or not) that is
    little endian, 3-D, placed by its sform and unscaled, exactly as nibabel reads it (its
    affine is the sform then, its data the stored values); None for any other file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if len(raw) < 352 or struct.unpack_from("<i", raw, 0)[0] != 348 or raw[344:348] != b"n+1\0":
        return None
    dim = struct.unpack_from("<8h", raw, 40)
    dtype = _DTYPES.get(struct.unpack_from("<h", raw, 70)[0])
    offset, slope, inter = struct.unpack_from("<3f", raw, 108)
    sform_code = struct.unpack_from("<h", raw, 254)[0]
    unscaled = inter == 0 and (slope in (0.0, 1.0) or math.isnan(slope))
    if dim[0] != 3 or min(dim[1:4]) < 1 or dtype is None or sform_code <= 0 or not unscaled:
        return None
    shape, dt = dim[1:4], np.dtype("<" + dtype)
    start = int(offset)
    if start != offset or start < 352 or start + math.prod(shape) * dt.itemsize > len(raw):
        return None
    # writable, as nibabel's: callers may edit what they loaded
    data = np.frombuffer(bytearray(raw), dt, math.prod(shape), start).reshape(shape, order="F")
    affine = np.eye(4)
    affine[:3] = np.array(struct.unpack_from("<12f", raw, 280), dtype=np.float32).reshape(3, 4)
    return data, affine
