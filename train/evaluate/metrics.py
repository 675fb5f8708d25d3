"""Image-quality metrics of the paper (section 2.5): MAE, PSNR and SSIM on the 12-bit scale.

L = 4095, K1 = 0.01, K2 = 0.03, all computed inside a brain mask on skull-stripped images
(both images multiplied by the mask). SSIM is a per-pixel map (Gaussian window, sigma 1.5,
11 taps, slice-wise in 2-D) averaged over the mask's voxels, not over the whole image.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "lesion_contrast",
    "masked_metrics",
    "paired_tests",
    "region_metrics",
    "ssim_map",
    "to_12bit",
]

L12 = 4095.0


def to_12bit(x01: np.ndarray, data_range: float = L12) -> np.ndarray:
    """Images prepared to [0, 1] on the paper's 12-bit scale (float64)."""
    return np.clip(np.asarray(x01, dtype=np.float64), 0.0, 1.0) * data_range


def ssim_map(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float = L12,
    k1: float = 0.01,
    k2: float = 0.03,
    sigma: float = 1.5,
    truncate: float = 3.5,
) -> np.ndarray:
    """SSIM map of Wang et al. (2004), the image's shape; a (Z, H, W) stack is taken slice by slice.

    Matches skimage's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    full=True)``: reflect-padded Gaussian moments and population (co)variances.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.shape != y.shape or x.ndim not in (2, 3):
        raise ValueError(f"need two (H, W) or (Z, H, W) images of one shape, got {x.shape}, {y.shape}")

    def blur(a: np.ndarray) -> np.ndarray:
        # In-plane only: slices are the paper's 2-D images, z must not mix.
        return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=truncate, axes=(-2, -1))

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    vxy = blur(x * y) - mx * my
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _over(diff: np.ndarray, smap: np.ndarray, sel: np.ndarray, data_range: float) -> dict:
    d = diff[sel]
    mse = float(np.mean(d * d))
    return {
        "mae": float(np.mean(np.abs(d))),
        "psnr": float("inf") if mse == 0 else float(10 * math.log10(data_range**2 / mse)),
        "ssim": float(np.mean(smap[sel])),
        "voxels": int(sel.sum()),
    }


def _stripped(pred, target, brain):
    brain = np.asarray(brain, dtype=bool)
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if not (x.shape == y.shape == brain.shape):
        raise ValueError(f"shapes differ: pred {x.shape}, target {y.shape}, mask {brain.shape}")
    return x * brain, y * brain, brain


def masked_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    data_range: float = L12,
    k1: float = 0.01,
    k2: float = 0.03,
) -> dict:
    """MAE, PSNR and mean SSIM over the mask's voxels of the skull-stripped images (already on data_range)."""
    x, y, mask = _stripped(pred, target, mask)
    if not mask.any():
        raise ValueError("empty mask")
    return _over(x - y, ssim_map(x, y, data_range, k1, k2), mask, data_range)


def region_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    brain: np.ndarray,
    regions: dict[str, np.ndarray],
    data_range: float = L12,
    k1: float = 0.01,
    k2: float = 0.03,
) -> dict[str, dict]:
    """:func:`masked_metrics` per named region (region & brain); empty regions are left out.

    The images are skull-stripped with ``brain`` and the SSIM map computed once, so a region's
    SSIM sees the same neighbourhood as the whole-brain SSIM instead of a region-cut image.
    """
    x, y, brain = _stripped(pred, target, brain)
    diff, smap = x - y, ssim_map(x, y, data_range, k1, k2)
    out = {}
    for name, region in regions.items():
        sel = np.asarray(region, dtype=bool) & brain
        if sel.any():
            out[name] = _over(diff, smap, sel, data_range)
    return out


def lesion_contrast(img: np.ndarray, lesion: np.ndarray, reference: np.ndarray) -> float | None:
    """Relative lesion contrast (mean(lesion) - mean(reference)) / mean(reference); None if undefined."""
    img = np.asarray(img, dtype=np.float64)
    lesion = np.asarray(lesion, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    if not lesion.any() or not reference.any():
        return None
    ref = float(img[reference].mean())
    if ref == 0:
        return None
    return (float(img[lesion].mean()) - ref) / ref


def _p(test, *args) -> float | None:
    # scipy answers degenerate samples with NaN, warnings or ValueError depending on the test and version.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(test(*args).pvalue)
        except ValueError:
            return None
    return p if math.isfinite(p) else None


def paired_tests(a, b) -> dict:
    """Wilcoxon signed-rank and paired t-test of two models' per-subject values (pairs with a value
    that is not finite dropped: the PSNR of a perfect synthesis is infinite, not a difference).

    A p-value that cannot be computed (n < 2, all differences zero, constant differences) is None.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    d = a - b
    wilcoxon_p = _p(stats.wilcoxon, a, b) if n >= 2 and np.any(d != 0) else None
    # Constant differences (up to rounding) have no spread: t is infinite or undefined, not evidence.
    ttest_p = _p(stats.ttest_rel, a, b) if n >= 2 and np.ptp(d) > 1e-12 * np.abs(d).max() else None
    return {
        "n": n,
        "mean_a": float(a.mean()) if n else None,
        "mean_b": float(b.mean()) if n else None,
        "mean_diff": float(d.mean()) if n else None,
        "wilcoxon_p": wilcoxon_p,
        "ttest_p": ttest_p,
    }
