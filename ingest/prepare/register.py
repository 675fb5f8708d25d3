"""Rigid co-registration of an mpMRI series to the MRF T1 map with itk-elastix.

The MRF map is the fixed image, the mpMRI the moving one (paper, section 2.3): the result
maps a point of the MRF grid (LPS mm) to the point of the mpMRI series it corresponds to,
so the mpMRI can be resampled onto the MRF grid without ever resampling the MRF maps.
Images go to ITK in their physical geometry (ITK's physical space is LPS, like ours), so
the scanner's own alignment is the starting point.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["itk_image", "rigid_register", "mutual_information", "rotation_deg"]


def itk_image(arr: np.ndarray, affine):
    """An ITK image of a ``(z, y, x)`` array with the store affine."""
    import itk

    affine = np.asarray(affine, float)
    sp = np.linalg.norm(affine[:3, :3], axis=0)                      # z, y, x
    img = itk.image_from_array(np.ascontiguousarray(arr, dtype=np.float32))
    img.SetSpacing([float(sp[2]), float(sp[1]), float(sp[0])])      # ITK index order is (x, y, z)
    img.SetOrigin([float(v) for v in affine[:3, 3]])
    direction = np.stack([affine[:3, 2] / sp[2], affine[:3, 1] / sp[1], affine[:3, 0] / sp[0]], axis=1)
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return img


def _parameter_object(cfg: dict):
    import itk

    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("rigid", int(cfg.get("resolutions", 3)))
    pm["Metric"] = ["AdvancedMattesMutualInformation"]
    pm["NumberOfHistogramBins"] = [str(int(cfg.get("histogram_bins", 32)))]
    pm["MaximumNumberOfIterations"] = [str(int(cfg.get("iterations", 300)))]
    pm["NumberOfSpatialSamples"] = [str(int(cfg.get("samples", 4096)))]
    # the random sampler is the only random choice elastix makes: fixed seed, same result
    pm["RandomSeed"] = [str(int(cfg.get("seed", 0)) + 1)]
    pm["WriteResultImage"] = ["false"]
    pm["ResultImagePixelType"] = ["float"]
    po.AddParameterMap(pm)
    return po


def rigid_register(fixed: np.ndarray, fixed_affine, moving: np.ndarray, moving_affine, cfg: dict) -> np.ndarray:
    """4x4 rigid transform, LPS mm: a point of the fixed image -> the same anatomy in the moving one."""
    import itk

    reg = itk.ElastixRegistrationMethod.New(itk_image(fixed, fixed_affine), itk_image(moving, moving_affine))
    reg.SetParameterObject(_parameter_object(cfg))
    # results depend on how the sample work is split: one thread count, always the same
    reg.SetNumberOfThreads(int(cfg.get("threads", 1)))
    reg.SetLogToConsole(False)
    reg.UpdateLargestPossibleRegion()
    tr = reg.ConvertToItkTransform(reg.GetCombinationTransform())
    # a rigid transform is affine: four points fix it
    o = np.array(tr.TransformPoint([0.0, 0.0, 0.0]))
    m = np.eye(4)
    for k in range(3):
        e = [0.0, 0.0, 0.0]
        e[k] = 1.0
        m[:3, k] = np.array(tr.TransformPoint(e)) - o
    m[:3, 3] = o
    if not np.all(np.isfinite(m)):
        raise ValueError("elastix returned a non-finite transform")
    return m


def rotation_deg(m: np.ndarray) -> float:
    r = np.asarray(m)[:3, :3]
    return math.degrees(math.acos(float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information (H(a) + H(b)) / H(a, b) over ``mask``: 1 = independent,
    higher = more shared structure. The QA number of a registration, before vs after."""
    sel = mask > 0
    x, y = a[sel].astype(float), b[sel].astype(float)
    if x.size < 16:
        return float("nan")
    h, _, _ = np.histogram2d(x, y, bins=bins)
    p = h / h.sum()

    def ent(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hab = ent(p)
    return (ent(p.sum(1)) + ent(p.sum(0))) / hab if hab > 0 else float("nan")
