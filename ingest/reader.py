"""Reading one DICOM series into an array and its LPS affine.

This is the classic single-frame path (one file per slice). The ingest service extends it
to enhanced multi-frame, mosaics and multi-volume series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom


class SeriesError(ValueError):
    pass


def _float_list(ds, tag: str, path) -> list[float]:
    val = getattr(ds, tag, None)
    if val is None:
        raise SeriesError(f"{path}: no {tag}: cannot place the slice in space")
    return [float(v) for v in val]


def read_series(paths) -> tuple[np.ndarray, np.ndarray, dict]:
    """Files of one series -> (array (Z, Y, X) float32 after rescale, affine_lps, meta).

    Slices are sorted along the slice normal (not by InstanceNumber, which vendors number
    either way); `affine_lps` maps (z, y, x) to patient LPS mm.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesError("no files given")
    slices = []
    for p in paths:
        ds = pydicom.dcmread(p)
        iop = np.array(_float_list(ds, "ImageOrientationPatient", p))
        ipp = np.array(_float_list(ds, "ImagePositionPatient", p))
        slices.append((ds, iop, ipp, p))
    iop0 = slices[0][1]
    for ds, iop, _, p in slices:
        if not np.allclose(iop, iop0, atol=1e-4):
            raise SeriesError(f"{p}: orientation differs from the rest of the series")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(np.dot(s[2], normal)))
    pos = np.array([float(np.dot(s[2], normal)) for s in slices])
    if len(pos) > 1:
        steps = np.diff(pos)
        if np.any(steps < 1e-3):
            raise SeriesError(f"{slices[0][3].parent}: two slices at the same position")
        if np.ptp(steps) > 0.01 * max(abs(steps.mean()), 1e-3) + 1e-3:
            raise SeriesError(f"{slices[0][3].parent}: uneven slice spacing (missing slice?)")
    ds0 = slices[0][0]
    dy, dx = _float_list(ds0, "PixelSpacing", slices[0][3])
    vol = np.stack([
        s[0].pixel_array.astype(np.float32) * float(getattr(s[0], "RescaleSlope", 1) or 1)
        + float(getattr(s[0], "RescaleIntercept", 0) or 0)
        for s in slices
    ])
    affine = np.eye(4)
    affine[:3, 2] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 3] = slices[0][2]
    if len(slices) > 1:
        affine[:3, 0] = (slices[-1][2] - slices[0][2]) / (len(slices) - 1)
    else:
        affine[:3, 0] = normal * float(getattr(ds0, "SliceThickness", 1.0) or 1.0)
    meta = {
        "series_description": str(getattr(ds0, "SeriesDescription", "")),
        "manufacturer": str(getattr(ds0, "Manufacturer", "")),
        "image_type": list(getattr(ds0, "ImageType", [])),
        "n_files": len(paths),
    }
    return vol, affine, meta
