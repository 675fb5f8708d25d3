"""NIfTI in the project's conventions: arrays indexed (z, y, x), affines to patient LPS.

NIfTI itself is (x, y, z) and RAS. Kept apart from the phantom (whose anatomy module needs
scipy) so the ingest workers and the server load a .nii.gz with nibabel alone.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
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
    import gzip
    import io

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
    hdr = nib.load(str(path)).header
    (s, sc), (q, qc) = hdr.get_sform(coded=True), hdr.get_qform(coded=True)
    return {"sform": s, "sform_code": int(sc), "qform": q, "qform_code": int(qc)}


def load_nifti_zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of save_nifti: (z, y, x) array and its (z, y, x) -> LPS affine."""
    img = nib.load(str(path))
    data = np.ascontiguousarray(np.asarray(img.dataobj).transpose(2, 1, 0))
    return data, RAS_TO_LPS @ img.affine[:, [2, 1, 0, 3]]
