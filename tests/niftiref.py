"""Compare a volume in this project's convention with a NIfTI file (e.g. dcm2niix output).

Project convention: ``volume[z, y, x]`` (or ``volume[t, z, y, x]`` for 4-D) and a
4x4 ``affine_lps`` with ``lps = affine_lps @ [z, y, x, 1]`` (DICOM LPS, mm).

NIfTI (nibabel): ``data[i, j, k(, t)]`` and ``ras = affine @ [i, j, k, 1]`` (RAS+,
mm); the 4th axis, when present, is volumes.

:func:`compare_to_nifti` brings the NIfTI onto our voxel axes (any permutation /
flip, found with ``nibabel.orientations`` from the voxel-to-voxel transform, so
oblique or 45-degree grids are matched correctly) and checks the grid
positions and the values.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

__all__ = ["LPS_FROM_RAS", "nifti_to_zyx_lps", "zyx_lps_to_xyz_ras", "compare_to_nifti", "reindexed"]

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_ZYX_FROM_XYZ = [2, 1, 0, 3]  # column permutation between (x, y, z) and (z, y, x) affines


def _load(nii: str | Path | nib.spatialimages.SpatialImage):
    return nii if isinstance(nii, nib.spatialimages.SpatialImage) else nib.load(str(nii))


def nifti_to_zyx_lps(nii_path) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI and re-express it in the project convention, no resampling.

    Returns ``(data, affine_lps)`` with data scaled (scl_slope / scl_inter applied,
    float64) and transposed to ``[z, y, x]`` (3-D) or ``[t, z, y, x]`` (4-D; more
    than 4 dims are refused), and ``affine_lps`` mapping ``(z, y, x)`` to LPS.
    The NIfTI's own voxel order is kept: (z, y, x) = (k, j, i).
    """
    img = _load(nii_path)
    data = np.asarray(img.get_fdata(dtype=np.float64))
    if data.ndim == 3:
        data = data.transpose(2, 1, 0)
    elif data.ndim == 4:
        data = data.transpose(3, 2, 1, 0)
    else:
        raise ValueError(f"expected 3-D or 4-D NIfTI, got shape {data.shape}")
    affine_lps = (LPS_FROM_RAS @ np.asarray(img.affine, dtype=np.float64))[:, _ZYX_FROM_XYZ]
    return data, affine_lps


def zyx_lps_to_xyz_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Our (z, y, x) -> LPS affine as a NIfTI-style (i, j, k) = (x, y, z) -> RAS affine."""
    return LPS_FROM_RAS @ np.asarray(affine_lps, dtype=np.float64)[:, _ZYX_FROM_XYZ]


def _corners(shape3) -> np.ndarray:
    ext = [(0, n - 1) for n in shape3]
    return np.array([[i, j, k, 1.0] for i in ext[0] for j in ext[1] for k in ext[2]]).T


def compare_to_nifti(volume_zyx, affine_lps, nii_path, atol_mm: float = 0.01, *,
                     rtol: float = 1e-6, atol: float | None = None) -> None:
    """Assert that ``nii_path`` holds ``volume_zyx`` on the grid ``affine_lps``.

    ``volume_zyx``: physical values (stored * slope + intercept) as ``[z, y, x]``
    or ``[t, z, y, x]`` (4-D: the NIfTI's 4th axis is t).  The NIfTI may store the
    same grid with its voxel axes in any order and direction; it is reoriented
    onto ours with ``io_orientation`` / ``apply_orientation`` / ``inv_ornt_aff``.
    Geometry: every corner voxel centre must agree within ``atol_mm``.  Values:
    ``|nii - ours| <= atol + rtol * |ours|`` with ``atol`` defaulting to
    ``1e-6 * max(1, max|ours|)`` (room for float32 scl_slope).  Raises
    AssertionError with a description of the first difference.
    """
    nii_path_s = getattr(nii_path, "get_filename", lambda: None)() or str(nii_path)
    img = _load(nii_path)
    ours = np.asarray(volume_zyx)
    if ours.ndim not in (3, 4):
        raise ValueError(f"volume_zyx must be 3-D or 4-D, got shape {ours.shape}")
    # ours -> NIfTI-like (x, y, z[, t]) array and (x, y, z) -> RAS affine
    ours_xyz = ours.transpose(2, 1, 0) if ours.ndim == 3 else ours.transpose(3, 2, 1, 0)
    ours_aff = zyx_lps_to_xyz_ras(affine_lps)

    nii_aff = np.asarray(img.affine, dtype=np.float64)
    nii_shape = tuple(int(s) for s in img.shape)
    if len(nii_shape) != ours.ndim or len(nii_shape) not in (3, 4):
        raise AssertionError(
            f"{nii_path_s}: NIfTI shape {nii_shape} vs ours (x, y, z[, t]) {ours_xyz.shape}: "
            "different number of dimensions")

    # NIfTI voxel -> our voxel; its orientation relative to our voxel axes.
    vox_to_vox = np.linalg.solve(ours_aff, nii_aff)
    ornt = io_orientation(vox_to_vox)
    perm = ornt[:, 0].astype(int)
    if sorted(perm.tolist()) != [0, 1, 2]:
        raise AssertionError(f"{nii_path_s}: cannot map NIfTI axes onto ours (ornt {ornt.tolist()})")
    data = np.asarray(img.get_fdata(dtype=np.float64))
    data = apply_orientation(data, ornt)
    aff = nii_aff @ inv_ornt_aff(ornt, nii_shape[:3])
    desc = (f"NIfTI axes (i, j, k) -> our (x, y, z) axes {perm.tolist()}, "
            f"flips {[bool(f < 0) for f in ornt[:, 1]]}")

    if data.shape != ours_xyz.shape:
        raise AssertionError(
            f"{nii_path_s}: shape after reorientation {data.shape} != ours (x, y, z[, t]) "
            f"{ours_xyz.shape} ({desc}; NIfTI shape {nii_shape})")

    corners = _corners(ours_xyz.shape[:3])
    dist = np.linalg.norm((aff @ corners - ours_aff @ corners)[:3], axis=0)
    if not float(dist.max()) <= atol_mm:
        worst = corners[:3, int(np.argmax(dist))].astype(int).tolist()
        raise AssertionError(
            f"{nii_path_s}: geometry differs by up to {dist.max():.6g} mm (> {atol_mm} mm) "
            f"at corner voxel (x, y, z) = {worst} ({desc}).\n"
            f"reoriented NIfTI affine (RAS, x/y/z):\n{np.array2string(aff, precision=5)}\n"
            f"ours as RAS x/y/z affine:\n{np.array2string(ours_aff, precision=5)}")

    ref = ours_xyz.astype(np.float64)
    tol = (1e-6 * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
           if atol is None else float(atol))
    bad = ~(np.abs(data - ref) <= tol + rtol * np.abs(ref))
    if bad.any():
        n_bad = int(bad.sum())
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        ours_idx = tuple(reversed(idx))  # (x, y, z[, t]) -> (z, y, x) / (t, z, y, x)
        raise AssertionError(
            f"{nii_path_s}: {n_bad} of {bad.size} voxels differ (tol {tol:.3g} + {rtol:g}*|v|); "
            f"first at ours index {ours_idx} ((t,) z, y, x): NIfTI "
            f"{data[idx]!r} vs ours {ref[idx]!r}; max |diff| "
            f"{float(np.nanmax(np.abs(data - ref))):.6g} ({desc})")


def rot(axis: int, deg: float) -> np.ndarray:
    """Rotation by `deg` about coordinate axis `axis` (0, 1, 2): oblique test geometries."""
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def reindexed(vol: np.ndarray, affine_lps, how: str) -> tuple[np.ndarray, np.ndarray]:
    """``vol`` (Z, Y, X) stored in another voxel order, with the affine that keeps every voxel
    where it is in the patient: ``how`` is "rows flipped", "columns flipped", "slices reversed"
    or "transposed" (rows and columns swapped)."""
    a = np.asarray(affine_lps, float)
    m = np.eye(4)                    # new index -> old index
    if how == "transposed":
        return vol.transpose(0, 2, 1).copy(), a @ m[[0, 2, 1, 3]].T
    axis = {"slices reversed": 0, "rows flipped": 1, "columns flipped": 2}[how]
    m[axis, axis], m[axis, 3] = -1.0, vol.shape[axis] - 1
    return np.flip(vol, axis).copy(), a @ m
