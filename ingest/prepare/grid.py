"""Grids, resampling and intensity scaling for the prepare stage, and their inverses.

A grid is ``(shape, affine)`` with the store convention: the 4x4 affine maps the voxel index
``(z, y, x)`` to patient LPS mm. The prepared grid keeps the native MRF slices and resizes
only in plane, in one orientation for every exam (:func:`canonical_grid`), so writing a result
back onto the native MRF grid is an in-plane resampling plus the inverse intensity scaling
(:func:`to_native`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = ["GridError", "ORIENTATION", "canonical_grid", "standard_grid", "resample", "percentile_scale", "apply_scale", "invert_scale", "rate_scale",
           "invert_rate", "normalise", "denormalise", "to_native"]


class GridError(ValueError):
    """A native grid the prepared grid cannot be built on (slices that are not axial, no geometry)."""


_AXIS_NAMES = ("left-right", "anterior-posterior", "superior-inferior")

# The prepared grid's index order, (z, y, x) running towards S, P and L (nibabel's axis codes).
# Input contracts carry it: a model that learnt slices in another order would run on these
# and synthesise from a turned picture, so it is refused instead.
ORIENTATION = "SPL"


def canonical_grid(native_shape, native_affine) -> tuple[tuple[int, int, int], np.ndarray]:
    """The same voxels indexed so that ``(z, y, x)`` run as near as they can to (S, P, L).

    A 2D model sees a slice as a picture: trained on slices with anterior at the top and the
    patient's left on the right, it would read a series stored with its rows flipped (a
    swapped phase-encoding direction, feet-first or prone positioning, another vendor's row
    order) as a different head. Only the order of the index axes changes (flips and an
    in-plane transpose, chosen on the nearest patient axes, so an oblique tilt stays), no
    voxel is interpolated, and :func:`to_native` undoes it through the affines.

    Raises :class:`GridError` when the slices are not axial (the slice axis is nearest L-R or
    A-P): the models take axial slices, and reslicing a 5 mm sagittal stack is not the same input.
    """
    from nibabel.orientations import io_orientation

    shape = tuple(int(v) for v in native_shape)
    a = np.asarray(native_affine, float)
    if a.shape != (4, 4) or not np.isfinite(a).all() or abs(float(np.linalg.det(a[:3, :3]))) < 1e-12:
        raise GridError("the voxel-to-patient affine is not an invertible 4 x 4 matrix")
    ornt = io_orientation(a)                 # per index axis: (nearest LPS axis, its sign)
    if np.isnan(ornt).any():
        raise GridError("the voxel-to-patient affine has a degenerate axis")
    world = [int(w) for w in ornt[:, 0]]
    if world[0] != 2:
        raise GridError(f"the slices are not axial: the slice axis runs {_AXIS_NAMES[world[0]]}; the models "
                        "take axial slices")
    # index axis k of the canonical grid runs along LPS axis 2 - k (S, then P, then L)
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    out_shape = [0, 0, 0]
    for i, (w, sign) in enumerate(zip(world, ornt[:, 1])):
        k = 2 - w
        out_shape[k] = shape[i]
        if sign > 0:
            m[i, k] = 1.0
        else:                                # native index n - 1 - j for canonical index j
            m[i, k] = -1.0
            m[i, 3] = shape[i] - 1
    return tuple(out_shape), a @ m


def standard_grid(native_shape, native_affine, size: int, pixel_mm: float | None = None
                  ) -> tuple[tuple[int, int, int], np.ndarray]:
    """The prepared grid: the native slices in :func:`canonical_grid` order, ``size x size`` in
    plane, centred on the native field of view.

    With ``pixel_mm``, prepared pixels are that many mm square whatever the upload's field of
    view or pixel shape: a model sees a head the size it learnt (over each exam's own field of
    view, a 320 mm scan would reach it shrunk and a 256 x 384 mm one squashed). Without it, the
    grid spans the native field of view and pixel j spans (canonical) native index
    ``[j * Y / size - 0.5, (j + 1) * Y / size - 0.5]``; the two agree where the field of view
    is ``size * pixel_mm`` square.
    """
    (z, y, x), native_affine = canonical_grid(native_shape, native_affine)
    if pixel_mm is None:
        fy, fx = y / size, x / size
    else:
        sy, sx = np.linalg.norm(np.asarray(native_affine, float)[:3, 1:3], axis=0)
        fy, fx = float(pixel_mm) / sy, float(pixel_mm) / sx
    # prepared pixel j's centre in native index: the two grids share their centre
    scale = np.array([[1.0, 0, 0, 0],
                      [0, fy, 0, (y - 1) / 2 - fy * (size - 1) / 2],
                      [0, 0, fx, (x - 1) / 2 - fx * (size - 1) / 2],
                      [0, 0, 0, 1.0]])
    return (z, size, size), np.asarray(native_affine, float) @ scale


def _offsets(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n - 0.5


def _snap(idx: np.ndarray, shape, tol: float = 1e-3) -> np.ndarray:
    """Index points within ``tol`` outside ``[0, n - 1]`` moved onto the edge voxel. scipy's
    "constant" mode counts a point 1e-14 past the last voxel centre as outside: a prepared
    slice that falls exactly on the first or last native slice came out empty or not by
    rounding alone (half the demo exams lost their first slice that way). ``tol`` covers the
    affines' own rounding too (stores keep them to 6 decimals, NIfTI in float32)."""
    for d, n in enumerate(shape):
        col = idx[:, d]
        col[(col < 0) & (col > -tol)] = 0.0
        col[(col > n - 1) & (col < n - 1 + tol)] = n - 1
    return idx


def resample(vol: np.ndarray, vol_affine, out_shape, out_affine, transform=None,
             footprint_mm=None, order: int = 1, max_samples: int = 6,
             slabs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``vol`` sampled on ``(out_shape, out_affine)``: returns (values, coverage).

    ``transform`` (4x4, LPS mm) maps an output point to the point of ``vol`` it shows (the
    registration result: fixed -> moving). Each output voxel is the mean over its footprint
    ``(thickness, height, width)`` in mm (default: its own voxel size), sampled at about the
    resolution of ``vol`` (at most ``max_samples`` per axis): a box slice profile through
    thick slices and an anti-aliased in-plane reduction, never a point sample of a thin
    slice. Points outside ``vol`` count as 0; ``coverage`` is the fraction of each output
    voxel's samples that fell inside it.

    ``slabs``: the slices of ``vol`` (its axis 0) are slabs of their spacing, not point samples:
    a sample takes the value of the slice it falls in (still interpolated in-plane). Averaged
    over the footprint, that is each slice weighted by its overlap with the output voxel. Without
    it, interpolating between slice centres and then averaging over the footprint blurs twice: a
    series already on the output's slices came back with a quarter of each slice in its
    neighbours.
    """
    vol = np.asarray(vol)
    out_affine = np.asarray(out_affine, float)
    vol_affine = np.asarray(vol_affine, float)
    t = np.eye(4) if transform is None else np.asarray(transform, float)
    out_sp = np.linalg.norm(out_affine[:3, :3], axis=0)
    fp = out_sp if footprint_mm is None else np.asarray(footprint_mm, float)
    vol_sp = np.linalg.norm(vol_affine[:3, :3], axis=0)
    # samples per output axis: enough to see every voxel of vol the footprint crosses
    step_mm = float(vol_sp.min())
    n = [1 if f <= 0 else min(max_samples, max(1, math.ceil(f / step_mm - 1e-6))) for f in fp]
    offs = np.stack(np.meshgrid(*[_offsets(k) * (f / s) for k, f, s in zip(n, fp, out_sp)],
                                indexing="ij"), -1).reshape(-1, 3)          # output index units
    m = np.linalg.inv(vol_affine) @ t @ out_affine                          # out index -> vol index
    zz, yy, xx = out_shape
    jj, ii = np.meshgrid(np.arange(yy), np.arange(xx), indexing="ij")
    plane = np.stack([np.zeros_like(jj), jj, ii], -1).reshape(-1, 3).astype(float)
    values = np.zeros(out_shape, np.float32)
    cover = np.zeros(out_shape, np.float32)
    src = np.asarray(vol, np.float32)
    inside = np.ones(src.shape, np.float32)
    for k in range(zz):
        pts = (plane + [k, 0, 0])[:, None, :] + offs[None, :, :]           # (P, S, 3)
        idx = _snap(pts.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3], src.shape)
        if slabs:  # the slice whose slab holds the point: slice k spans k - 0.5 to k + 0.5
            idx[:, 0] = np.floor(idx[:, 0] + 0.5)
        v = ndi.map_coordinates(src, idx.T, order=order, mode="constant", cval=0.0, prefilter=order > 1)
        c = ndi.map_coordinates(inside, idx.T, order=1, mode="constant", cval=0.0)
        values[k] = v.reshape(yy, xx, -1).mean(-1)
        cover[k] = c.reshape(yy, xx, -1).mean(-1)
    return values, cover


def percentile_scale(vol: np.ndarray, mask: np.ndarray, percentiles=(0.5, 99.5)) -> tuple[float, float]:
    """(lo, hi) of ``vol`` inside ``mask``: robust to a few hot voxels (vessels, artefacts)."""
    vals = vol[mask > 0]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise ValueError("no finite voxel inside the brain mask")
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    return lo, hi


def apply_scale(vol: np.ndarray, lo: float, hi: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Scanner units -> [0, 1]; 0 outside the mask (the brain is all the model sees)."""
    out = np.clip((np.asarray(vol, np.float32) - lo) / (hi - lo), 0.0, 1.0)
    if mask is not None:
        out = np.where(mask > 0, out, 0.0)
    return out.astype(np.float32)


def invert_scale(vol: np.ndarray, lo: float, hi: float, mask: np.ndarray | None = None) -> np.ndarray:
    out = np.asarray(vol, np.float32) * (hi - lo) + lo
    if mask is not None:
        out = np.where(mask > 0, out, 0.0)
    return out.astype(np.float32)


def rate_scale(vol: np.ndarray, ref_ms: float, mask: np.ndarray | None = None) -> np.ndarray:
    """A relaxation time map (ms) -> ``ref_ms / T`` clipped to [0, 1]: the relaxation rate on a
    fixed scale. MRF measures T1 and T2 in absolute units, and a per-exam percentile scale
    would throw that away (the same white matter would get a different input value in every
    exam). Rates also spread the short times of brain tissue over most of [0, 1] and compress
    the long times of CSF. ``T <= 0`` (a voxel the MRF check zeroed) -> 0."""
    return np.clip(invert_rate(vol, ref_ms, mask), 0.0, 1.0)


def invert_rate(vol: np.ndarray, ref_ms: float, mask: np.ndarray | None = None) -> np.ndarray:
    """:func:`rate_scale` undone: ``ref_ms / x``, 0 where ``x`` is 0 (no measurement); a clipped
    voxel (``T < ref_ms``) comes back as ``ref_ms``. The map is its own inverse, so
    :func:`rate_scale` is this, clipped."""
    x = np.asarray(vol, np.float32)
    # a subnormal x (resampling leaves some at the head's edge) overflows to inf: rate_scale
    # clips it to 1 and the brain mask zeroes it; numpy's warning would only alarm a log reader
    with np.errstate(over="ignore"):
        out = np.where(x > 0, np.float32(ref_ms) / np.where(x > 0, x, 1.0), 0.0)
    if mask is not None:
        out = np.where(mask > 0, out, 0.0)
    return out.astype(np.float32)


def normalise(vol: np.ndarray, scale: dict, mask: np.ndarray | None = None) -> np.ndarray:
    """Scanner units -> [0, 1] by a store's ``scale`` entry: ``{"rate_ms"}`` or ``{"lo", "hi"}``."""
    if "rate_ms" in scale:
        return rate_scale(vol, scale["rate_ms"], mask)
    return apply_scale(vol, scale["lo"], scale["hi"], mask)


def denormalise(vol: np.ndarray, scale: dict, mask: np.ndarray | None = None) -> np.ndarray:
    """[0, 1] -> scanner units by a store's ``scale`` entry (the inverse of :func:`normalise`)."""
    if "rate_ms" in scale:
        return invert_rate(vol, scale["rate_ms"], mask)
    return invert_scale(vol, scale["lo"], scale["hi"], mask)


def to_native(vol: np.ndarray, inversion: dict, scale: dict | None = None, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A prepared volume ``(Z, H, W)`` back on the native MRF grid: (array, native affine).

    ``inversion`` is the prepared store's ``inversion`` attribute; ``scale`` an entry of its
    ``scale`` attribute (see :func:`denormalise`), given to return scanner units instead of [0, 1].
    """
    shape = tuple(inversion["native_shape"])
    native_aff = np.asarray(inversion["native_affine_lps"], float)
    prep_aff = np.asarray(inversion["prepared_affine_lps"], float)
    out, _ = resample(vol, prep_aff, shape, native_aff, footprint_mm=[0.0, *np.linalg.norm(native_aff[:3, 1:3], axis=0)],
                      order=order)
    if scale is not None:
        inside = out > 0
        out = np.where(inside, denormalise(out, scale), 0.0).astype(np.float32)
    return out, native_aff
