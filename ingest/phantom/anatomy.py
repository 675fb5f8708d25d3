"""Anatomy for the phantom: tissue fraction maps of a whole head, per subject.

The brain comes from a pluggable source (default: the MNI152 2009 GM/WM maps that ship
inside the nilearn wheel, CSF derived as the template's brain minus GM and WM), resampled
onto an LPS-aligned working grid. A skull, scalp and subarachnoid CSF are grown around it
so that skull stripping downstream has something real to strip. Each subject then gets its
own smooth deformation, veins (for SWI) and, for the glioblastoma cohort, lesions.

Everything here lives in the *head frame*: LPS millimetres with the origin at the centre
of the brain. Where the head sits in the scanner is decided per series (geometry.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ingest.nifti import RAS_TO_LPS

# Fraction-map names. "air" is implicit: 1 - sum(fractions).
TISSUES = (
    "csf", "gm", "wm", "fat", "bone", "muscle", "vein",
    "necrosis", "enhancing", "oedema", "haemorrhage",
)
# Ground-truth label values written beside the DICOM (labels.nii.gz).
LABELS = {
    "background": 0, "csf": 1, "gm": 2, "wm": 3, "fat": 4, "bone": 5, "muscle": 6,
    "vein": 7, "necrosis": 8, "enhancing": 9, "oedema": 10, "haemorrhage": 11,
}
BRAIN_TISSUES = ("csf", "gm", "wm", "vein", "necrosis", "enhancing", "oedema", "haemorrhage")



class AnatomyError(ValueError):
    pass


@dataclass
class Anatomy:
    fractions: dict[str, np.ndarray]     # each (I, J, K) float32 in [0, 1]
    affine: np.ndarray                   # (i, j, k) -> head-frame LPS mm
    lesions: list[dict] = field(default_factory=list)
    chi: np.ndarray | None = None        # susceptibility, ppm relative to CSF

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.fractions.values())).shape

    @property
    def voxel_mm(self) -> float:
        return float(abs(self.affine[0, 0]))

    def labels(self) -> np.ndarray:
        """Hard labels: the dominant tissue, background where air dominates."""
        names = list(self.fractions)
        stack = np.stack([self.fractions[n] for n in names])
        air = 1.0 - stack.sum(0)
        lab = np.argmax(stack, 0)
        out = np.array([LABELS[n] for n in names], np.uint8)[lab]
        out[air >= stack.max(0)] = 0
        # Thin structures that matter clinically win where they hold a fair share.
        for name in ("vein", "haemorrhage", "enhancing"):
            out[(self.fractions[name] >= 0.4) & (out != 0)] = LABELS[name]
        return out

    def brain(self) -> np.ndarray:
        tot = sum(self.fractions[n] for n in BRAIN_TISSUES)
        return (tot >= 0.5).astype(np.uint8)


# ---------------------------------------------------------------- template sources

def _nilearn_data_dir() -> Path:
    import nilearn

    return Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"


def _load_prob(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise AnatomyError(f"{path}: missing (an anatomy folder needs gm.nii.gz, wm.nii.gz, csf.nii.gz)")
    except Exception as exc:  # nibabel raises a zoo of types on bad files
        raise AnatomyError(f"{path}: not a readable NIfTI ({exc.__class__.__name__}: {exc})")
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise AnatomyError(f"{path}: expected a 3-D probability map, got shape {data.shape}")
    if not np.isfinite(data).all() or data.min() < 0:
        raise AnatomyError(f"{path}: probability map has negative or non-finite values")
    top = data.max()
    if top <= 0:
        raise AnatomyError(f"{path}: probability map is empty")
    if top > 1.0 + 1e-6:  # stored as 0..255 (the MNI files) or percent
        data = data / top
    return data, RAS_TO_LPS @ img.affine


def load_template(anatomy_dir: Path | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """GM/WM/CSF probability maps and their (i, j, k) -> LPS affine."""
    if anatomy_dir is None:
        d = _nilearn_data_dir()
        gm, aff = _load_prob(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
        wm, _ = _load_prob(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
        t1, _ = _load_prob(d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
        # The template ships no CSF map; its T1 is skull-stripped, so the intracranial
        # space it covers minus GM and WM is CSF (ventricles, sulci).
        csf = np.clip((t1 > 0).astype(np.float64) - gm - wm, 0.0, 1.0)
        return {"gm": gm, "wm": wm, "csf": csf}, aff
    anatomy_dir = Path(anatomy_dir)
    if not anatomy_dir.is_dir():
        raise AnatomyError(f"{anatomy_dir}: anatomy folder does not exist")
    maps, affines = {}, {}
    for name in ("gm", "wm", "csf"):
        maps[name], affines[name] = _load_prob(anatomy_dir / f"{name}.nii.gz")
    for name in ("wm", "csf"):
        if maps[name].shape != maps["gm"].shape or not np.allclose(affines[name], affines["gm"], atol=1e-3):
            raise AnatomyError(
                f"{anatomy_dir / (name + '.nii.gz')}: not on the grid of gm.nii.gz "
                f"(shape {maps[name].shape} vs {maps['gm'].shape}, or a different affine)"
            )
    total = maps["gm"] + maps["wm"] + maps["csf"]
    if total.max() > 1.5:
        raise AnatomyError(f"{anatomy_dir}: gm + wm + csf exceeds 1.5 somewhere: not probability maps")
    scale = np.maximum(total, 1.0)
    return {k: v / scale for k, v in maps.items()}, affines["gm"]


# ---------------------------------------------------------------- working grid and head

def _resample(vol: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape, order=1) -> np.ndarray:
    """Pull `vol` onto a grid; coordinates by broadcasting (no BLAS) to stay bit-reproducible."""
    m = np.linalg.inv(src_affine) @ dst_affine
    idx = np.indices(shape, dtype=np.float64)
    coords = [
        m[r, 0] * idx[0] + m[r, 1] * idx[1] + m[r, 2] * idx[2] + m[r, 3] for r in range(3)
    ]
    return ndimage.map_coordinates(vol, coords, order=order, mode="constant", cval=0.0)


def _shell(dist: np.ndarray, inner: float, outer: float, soft: float) -> np.ndarray:
    """Fraction of a voxel between two distances from the brain surface, with soft edges."""
    rise = np.clip((dist - inner) / soft + 0.5, 0.0, 1.0)
    fall = np.clip((outer - dist) / soft + 0.5, 0.0, 1.0)
    return rise * fall


def build_head(template: dict[str, np.ndarray], template_affine: np.ndarray, voxel_mm: float) -> Anatomy:
    """Resample the brain onto an LPS-aligned grid centred on it, and grow a head around it."""
    brain_prob = template["gm"] + template["wm"] + template["csf"]
    ijk = np.argwhere(brain_prob > 0.5)
    if len(ijk) < 100:
        raise AnatomyError("anatomy: fewer than 100 brain voxels (gm + wm + csf > 0.5)")
    corners = np.array([[a, b, c, 1.0] for a in (ijk[:, 0].min(), ijk[:, 0].max())
                        for b in (ijk[:, 1].min(), ijk[:, 1].max())
                        for c in (ijk[:, 2].min(), ijk[:, 2].max())])
    world = corners @ template_affine.T
    centre = 0.5 * (world[:, :3].min(0) + world[:, :3].max(0))
    margin = 24.0  # room for CSF rim, skull and scalp
    lo = world[:, :3].min(0) - margin
    hi = world[:, :3].max(0) + margin
    shape = tuple(int(np.ceil((h - l) / voxel_mm)) + 1 for l, h in zip(lo, hi))
    grid_affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    grid_affine[:3, 3] = lo
    src = {k: _resample(v, template_affine, grid_affine, shape) for k, v in template.items()}
    # Head frame: origin at the centre of the brain's bounding box.
    grid_affine[:3, 3] = lo - centre

    intracranial = ndimage.gaussian_filter((src["gm"] + src["wm"] + src["csf"]), 1.0 / voxel_mm) > 0.5
    intracranial = ndimage.binary_fill_holes(intracranial)
    # Distance outward from the intracranial surface, in mm.
    dist = ndimage.distance_transform_edt(~intracranial, sampling=voxel_mm)
    soft = max(voxel_mm, 1.0)
    frac = {t: np.zeros(shape, np.float64) for t in TISSUES}
    frac["gm"], frac["wm"] = src["gm"], src["wm"]
    frac["csf"] = src["csf"] + _shell(dist, 0.0, 2.5, soft) * (dist > 0)
    skull = _shell(dist, 2.5, 9.0, soft)
    diploe = _shell(dist, 4.5, 7.0, soft)  # fatty marrow between the tables
    frac["bone"] = skull - 0.6 * diploe
    frac["fat"] = 0.6 * diploe + _shell(dist, 11.0, 15.0, soft)
    frac["muscle"] = _shell(dist, 9.0, 11.0, soft) + _shell(dist, 15.0, 16.5, soft)  # galea and skin
    total = sum(frac.values())
    scale = np.maximum(total, 1.0)
    return Anatomy({k: (v / scale).astype(np.float32) for k, v in frac.items()}, grid_affine)


# ---------------------------------------------------------------- subjects

def _smooth_field(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    """Unit-variance smooth random field; drawn coarse and upsampled so it costs little."""
    step = max(1, int(sigma_vox))
    coarse = rng.standard_normal(tuple(s // step + 4 for s in shape))
    coarse = ndimage.gaussian_filter(coarse, sigma_vox / step, mode="wrap")
    fine = ndimage.zoom(coarse, step, order=1)[: shape[0], : shape[1], : shape[2]]
    fine = fine - fine.mean()
    return fine / max(fine.std(), 1e-12)


def _grid_mm(anat: Anatomy) -> list[np.ndarray]:
    idx = np.indices(anat.shape, dtype=np.float64)
    a = anat.affine
    return [a[r, r] * idx[r] + a[r, 3] for r in range(3)]


def deform(anat: Anatomy, rng: np.random.Generator, scale_sd=0.04, warp_mm=2.5, warp_sigma_mm=18.0) -> Anatomy:
    """A new subject: global head-size scaling plus a smooth nonlinear warp."""
    v = anat.voxel_mm
    scales = 1.0 + np.clip(rng.normal(0.0, scale_sd, 3), -2.5 * scale_sd, 2.5 * scale_sd)
    disp = [warp_mm / v * _smooth_field(rng, anat.shape, warp_sigma_mm / v) for _ in range(3)]
    idx = np.indices(anat.shape, dtype=np.float64)
    centre = -anat.affine[:3, 3] / v  # voxel index of the head-frame origin
    coords = [centre[r] + (idx[r] - centre[r]) / scales[r] + disp[r] for r in range(3)]
    out = {k: ndimage.map_coordinates(f, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
           for k, f in anat.fractions.items()}
    return Anatomy(out, anat.affine.copy())


def _replace(anat: Anatomy, name: str, amount: np.ndarray, spare: tuple[str, ...] = ()) -> None:
    """Give `amount` of each voxel to tissue `name`, taken proportionally from the others."""
    amount = np.clip(amount, 0.0, 1.0)
    keep = 1.0 - amount
    for k in anat.fractions:
        if k != name and k not in spare:
            anat.fractions[k] = (anat.fractions[k] * keep).astype(np.float32)
    anat.fractions[name] = np.clip(anat.fractions[name] + amount, 0.0, 1.0).astype(np.float32)


def _tube(anat: Anatomy, points: np.ndarray, radius_mm: float) -> np.ndarray:
    """Partial-volume fraction of a tube of given radius around a polyline."""
    from scipy.spatial import cKDTree

    v = anat.voxel_mm
    # densify so the point cloud stands in for the curve
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    dense = [points[:1]]
    for p, q, s in zip(points[:-1], points[1:], seg):
        n = max(1, int(np.ceil(s / (0.3 * v))))
        t = (np.arange(1, n + 1) / n)[:, None]
        dense.append(p + t * (q - p))
    cloud = np.concatenate(dense)
    lo = ((cloud.min(0) - radius_mm - 2 * v - anat.affine[:3, 3]) / v).astype(int)
    hi = ((cloud.max(0) + radius_mm + 2 * v - anat.affine[:3, 3]) / v).astype(int) + 2
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, anat.shape)
    out = np.zeros(anat.shape, np.float32)
    if np.any(hi <= lo):
        return out
    sub = np.indices(tuple(hi - lo), dtype=np.float64).reshape(3, -1).T
    xyz = (sub + lo) * v + anat.affine[:3, 3]
    d, _ = cKDTree(cloud).query(xyz, distance_upper_bound=radius_mm + 2 * v)
    frac = np.clip((radius_mm - d) / v + 0.5, 0.0, 1.0)
    frac[~np.isfinite(d)] = 0.0
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = frac.reshape(tuple(hi - lo))
    return out


def _random_curve(rng, start, direction, length_mm, step_mm=2.0, wiggle=0.25) -> np.ndarray:
    pts = [np.asarray(start, float)]
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    for _ in range(int(length_mm / step_mm)):
        d = d + wiggle * rng.standard_normal(3)
        d /= np.linalg.norm(d)
        pts.append(pts[-1] + step_mm * d)
    return np.array(pts)


def add_veins(anat: Anatomy, rng: np.random.Generator, n_cortical: int = 14) -> None:
    """Venous anatomy that SWI shows: the superior sagittal sinus, deep and cortical veins."""
    x, y, z = _grid_mm(anat)
    intracranial = (anat.fractions["gm"] + anat.fractions["wm"] + anat.fractions["csf"]) > 0.5
    v = anat.voxel_mm
    # Superior sagittal sinus: along the top of the midline, just inside the skull.
    mid = int(round(-anat.affine[0, 3] / v))
    ys, zs = [], []
    for j in range(0, anat.shape[1], max(1, int(4 / v))):
        col = np.nonzero(intracranial[mid, j])[0]
        if len(col) and (j * v + anat.affine[1, 3]) < 70:
            ys.append(j * v + anat.affine[1, 3])
            zs.append(col.max() * v + anat.affine[2, 3] - 3.0)
    if len(ys) > 3:
        sss = np.stack([np.zeros(len(ys)), ys, zs], 1)
        sss = sss[sss[:, 2] > np.percentile(sss[:, 2], 35)]
        _replace(anat, "vein", _tube(anat, sss, 3.0 + 0.5 * rng.random()))
    # Internal cerebral veins, paired beside the midline above the third ventricle.
    for side in (-1, 1):
        start = np.array([side * 2.5, -5.0 + 3 * rng.standard_normal(), 12.0 + 3 * rng.standard_normal()])
        curve = _random_curve(rng, start, [0, 1, 0.15], 35.0, wiggle=0.08)
        _replace(anat, "vein", _tube(anat, curve, 1.3))
    # Cortical/medullary veins: short curved vessels starting inside brain tissue.
    brain_pts = np.argwhere((anat.fractions["wm"] + anat.fractions["gm"]) > 0.7)
    for _ in range(n_cortical):
        p = brain_pts[rng.integers(len(brain_pts))] * v + anat.affine[:3, 3]
        outward = p / max(np.linalg.norm(p), 1e-6)
        curve = _random_curve(rng, p, outward + 0.5 * rng.standard_normal(3), rng.uniform(15, 40))
        _replace(anat, "vein", _tube(anat, curve, rng.uniform(0.6, 1.2)) * intracranial)


def add_lesions(anat: Anatomy, rng: np.random.Generator, n: int = 1) -> list[dict]:
    """Glioblastoma-like lesions: necrotic core, enhancing rim, oedema spreading along WM."""
    v = anat.voxel_mm
    x, y, z = _grid_mm(anat)
    wm, gm = anat.fractions["wm"], anat.fractions["gm"]
    brain = (wm + gm + anat.fractions["csf"]) > 0.5
    depth = ndimage.distance_transform_edt(brain, sampling=v)
    lesions = []
    for _ in range(n):
        r_core = rng.uniform(3.0, 11.0)
        rim = rng.uniform(2.0, 5.0)
        r_oed = r_core + rim + rng.uniform(6.0, 22.0)
        # Centres in deep white matter of the cerebrum, away from the surface, within the
        # axial band a 5 mm MRF slab will cover.
        ok = (wm > 0.6) & (depth > r_core + rim + 4.0) & (np.abs(z) < 30.0)
        cand = np.argwhere(ok)
        if len(cand) == 0:
            break
        c = cand[rng.integers(len(cand))] * v + anat.affine[:3, 3]
        irregular = 1.0 + 0.22 * _smooth_field(rng, anat.shape, 5.0 / v)
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) * irregular
        ramp = lambda r: np.clip((r - d) / v + 0.5, 0.0, 1.0)  # noqa: E731
        core = ramp(r_core)
        rim_f = ramp(r_core + rim) - core
        oed = (ramp(r_oed) - ramp(r_core + rim)) * np.clip(wm + 0.35 * gm, 0.0, 1.0)
        # Oedema thins out towards its edge rather than stopping at a sphere.
        oed *= np.clip((r_oed - d) / (0.5 * (r_oed - r_core - rim)), 0.0, 1.0)
        mask = brain.astype(np.float32)
        _replace(anat, "oedema", oed * mask)
        _replace(anat, "enhancing", rim_f * mask)
        _replace(anat, "necrosis", core * mask)
        entry = {
            "centre_mm": [round(float(t), 3) for t in c],
            "core_radius_mm": round(r_core, 3),
            "rim_mm": round(rim, 3),
            "oedema_radius_mm": round(r_oed, 3),
            "haemorrhage": False,
        }
        if rng.random() < 0.5:  # microbleeds within the rim and core
            for _ in range(int(rng.integers(1, 4))):
                off = rng.standard_normal(3)
                p = c + off / np.linalg.norm(off) * rng.uniform(0.3, 1.0) * (r_core + rim * 0.5)
                blob = np.clip((rng.uniform(1.0, 2.5) - np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2)) / v + 0.5, 0, 1)
                _replace(anat, "haemorrhage", blob * mask)
            entry["haemorrhage"] = True
        lesions.append(entry)
    anat.lesions = lesions
    return lesions


# Susceptibility relative to CSF (ppm), 3T QSM literature (e.g. Deistung 2013, Liu 2015).
CHI_PPM = {
    "csf": 0.0, "gm": 0.015, "wm": -0.025, "fat": 0.6, "bone": -2.0, "muscle": -0.02,
    "vein": 0.40, "necrosis": 0.02, "enhancing": 0.03, "oedema": -0.005, "haemorrhage": 0.9,
}


def susceptibility(anat: Anatomy) -> np.ndarray:
    chi = np.zeros(anat.shape, np.float64)
    for k, f in anat.fractions.items():
        chi += CHI_PPM[k] * f
    return chi


def make_subject(base: Anatomy, rng: np.random.Generator, cohort: str) -> Anatomy:
    anat = deform(base, rng)
    add_veins(anat, rng)
    if cohort == "gbm":
        add_lesions(anat, rng, n=2 if rng.random() < 0.2 else 1)
    anat.chi = susceptibility(anat)
    return anat
