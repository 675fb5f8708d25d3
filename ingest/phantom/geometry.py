"""Where the head sits in the scanner and where each series' slices are.

Each series gets its own head pose (the subject moves between series) and its own slab
(angulation, field of view, matrix, slice thickness and gap), so mpMRI is not voxel-aligned
with MRF and registration is really needed downstream. The pose is the rigid map from the
head frame (anatomy.py) to scanner/patient LPS; it is recorded as ground truth.

Affines follow the project's convention: (z, y, x) voxel index -> patient LPS mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# How each size scales Table 1. Demo keeps the protocols' ratios (site B still twice as
# finely reconstructed as site A) but with 4x coarser pixels and a thinner slab.
SIZES = {
    "demo": {"subjects": {"site-A": 8, "site-B": 6}, "inplane_factor": 4, "coverage_mm": 90.0,
             "anatomy_mm": 2.0},
    "paper": {"subjects": {"site-A": 32, "site-B": 18}, "inplane_factor": 1, "coverage_mm": 140.0,
              "anatomy_mm": 1.0},
}


def rotation(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(r: np.ndarray, t) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = t
    return m


@dataclass
class SeriesGeometry:
    affine: np.ndarray        # (z, y, x) -> LPS, recon grid, as the DICOM headers will say
    shape: tuple[int, int, int]
    acq_matrix: int
    thickness: float
    gap: float
    pose: np.ndarray          # head frame -> LPS at the time of this series

    @property
    def pixel_spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 2]))


def scaled_protocol(series: dict, size: str) -> dict:
    """Table 1 geometry at the requested size (demo: coarser pixels, thicker thin slices)."""
    f = SIZES[size]["inplane_factor"]
    n_recon = int(round(series["fov"] / series["pixel_spacing"]))
    out = {
        "n_recon": max(16, int(round(n_recon / f))),
        "acq_matrix": max(16, int(round(series["acq_matrix"] / f))),
        "thickness": float(series["thickness"]),
        "gap": float(series.get("gap", 0.0)),
    }
    out["acq_matrix"] = min(out["acq_matrix"], out["n_recon"])
    if f > 1:
        t = out["thickness"]
        out["thickness"] = float(min(f * t, max(t, 4.0)))
        out["gap"] = out["gap"] * out["thickness"] / t
    out["fov"] = float(series["fov"])
    return out


def subject_pose(rng: np.random.Generator) -> np.ndarray:
    """Head position in the coil: a few degrees of nod/roll/yaw, a few mm off isocentre."""
    ang = rng.normal(0.0, [4.0, 2.5, 2.5])
    t = rng.normal(0.0, [2.0, 4.0, 6.0])
    return rigid(rotation(*ang), t)


def series_pose(base: np.ndarray, rng: np.random.Generator, motion_deg: float, motion_mm: float) -> np.ndarray:
    r = rotation(*rng.normal(0.0, motion_deg, 3))
    centre_shift = rng.normal(0.0, motion_mm, 3)
    return rigid(base[:3, :3] @ r, base[:3, 3] + centre_shift)


def plan_series(series: dict, size: str, pose: np.ndarray, exam_tilt_deg: float,
                rng: np.random.Generator, round_affine) -> SeriesGeometry:
    """Slab of one series: axial-oblique, planned on the head like a technologist would."""
    p = scaled_protocol(series, size)
    n = p["n_recon"]
    dxy = p["fov"] / n
    step = p["thickness"] + p["gap"]
    coverage = SIZES[size]["coverage_mm"] + (20.0 if series.get("acq_type") == "3D" else 0.0)
    nz = max(3, int(round(coverage / step)))
    # Angulation follows the head's nod (AC-PC planning) with the operator's own error.
    tilt = exam_tilt_deg + rng.normal(0.0, 2.5)
    r_slab = pose[:3, :3] @ rotation(tilt, rng.normal(0.0, 1.5), rng.normal(0.0, 1.0))
    row, col, normal = r_slab[:, 0], r_slab[:, 1], r_slab[:, 2]
    # Centre a little above the head centre (the cerebrum), off by the operator's placement.
    centre = pose[:3, :3] @ np.array([0.0, 0.0, 12.0]) + pose[:3, 3] + rng.normal(0.0, 3.0, 3)
    origin = centre - row * dxy * (n - 1) / 2 - col * dxy * (n - 1) / 2 - normal * step * (nz - 1) / 2
    affine = np.eye(4)
    affine[:3, 0] = normal * step
    affine[:3, 1] = col * dxy
    affine[:3, 2] = row * dxy
    affine[:3, 3] = origin
    return SeriesGeometry(
        affine=round_affine(affine), shape=(nz, n, n), acq_matrix=p["acq_matrix"],
        thickness=p["thickness"], gap=p["gap"], pose=pose,
    )


def sample_points(geo: SeriesGeometry, z: int, m_fine: int, offsets_mm: np.ndarray) -> np.ndarray:
    """LPS positions (3, S, M, M) of the fine in-plane grid of slice z at through-slice offsets.

    The fine grid spans the recon FOV with its sample 0 on recon pixel 0, so FFT cropping and
    zero-filling keep the pixel centres exactly where the headers say they are.
    """
    a = geo.affine
    n = geo.shape[1]
    f = n / m_fine
    normal = a[:3, 0] / np.linalg.norm(a[:3, 0])
    base = a[:3, 3] + z * a[:3, 0]
    v = np.arange(m_fine, dtype=np.float64) * f
    out = (base[:, None, None, None]
           + normal[:, None, None, None] * offsets_mm[None, :, None, None]
           + a[:3, 1][:, None, None, None] * v[None, None, :, None]
           + a[:3, 2][:, None, None, None] * v[None, None, None, :])
    return out
