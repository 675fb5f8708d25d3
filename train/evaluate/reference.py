"""A learned voxel-wise reference: how much of a contrast the MRF maps carry near each voxel.

When QS-Net misses a quality bar, two explanations look the same in its numbers: the network
has not learned what its inputs hold (too few steps, a poor optimum), or the inputs do not
hold the contrast (on the phantom, site A's SWI phase mask depends on susceptibility, which
T1 and T2 do not show). This reference tells them apart. Gradient-boosted trees (scikit-learn's
``HistGradientBoostingRegressor``) map the T1 and T2 map at a voxel, the two maps smoothed at
two scales, and their gradient magnitudes, to the normalised target. They are fitted on the
same site's training exams as the physics baseline, inside the brain.

It is not an upper bound: a network sees a wider context than two smoothing scales. Where the
reference reaches a bar that QS-Net misses, though, the maps do carry the contrast at that
level and the network has not learned it yet.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ingest.prepare.service import scored_mask
from train.evaluate.physics import _open, naming

__all__ = ["VoxelRegression", "voxel_features"]

SIGMAS = (1.0, 2.0)  # in-plane pixels: the neighbourhood the trees see
MAX_VOXELS = 200_000  # a subsample beyond this: the fit stays a few seconds at the paper's size


def voxel_features(x: np.ndarray) -> np.ndarray:
    """``(Z, H, W, F)`` features of a prepared ``input`` array ``(2, Z, H, W)``, slice by slice."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[0] != 2:
        raise ValueError(f"need the prepared (2, Z, H, W) T1/T2 input, got shape {x.shape}")
    out = []
    for m in x:
        out.append(m)
        for s in SIGMAS:
            out.append(ndimage.gaussian_filter(m, s, axes=(1, 2)))
        out.append(ndimage.gaussian_gradient_magnitude(m, SIGMAS[0], axes=(1, 2)))
    return np.stack(out, axis=-1)


class VoxelRegression:
    """``target ~ trees(features)`` for one role, fitted over a site's training exams."""

    def __init__(self, role: str, max_iter: int = 200, seed: int = 0):
        self.role = role
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.model = None
        self.voxels = 0

    def fit(self, stores) -> "VoxelRegression":
        from sklearn.ensemble import HistGradientBoostingRegressor

        feats, targets = [], []
        for store in stores:
            g, name = _open(store)
            if self.role not in g:
                raise KeyError(f"{name}: no {self.role!r} array to fit the reference on")
            with naming(name):
                brain = scored_mask(g, self.role)   # where the series gives a truth
                feats.append(voxel_features(g["input"][...])[brain])
                targets.append(np.asarray(g[self.role][...], np.float32)[brain])
        x, y = np.concatenate(feats), np.concatenate(targets)
        if len(y) == 0:
            raise ValueError(f"{self.role}: no brain voxels in the training stores to fit the reference on")
        if len(y) > MAX_VOXELS:
            keep = np.random.default_rng(self.seed).choice(len(y), MAX_VOXELS, replace=False)
            x, y = x[keep], y[keep]
        # a fixed number of rounds and no held-out split: the same exams give the same trees
        self.model = HistGradientBoostingRegressor(max_iter=self.max_iter, early_stopping=False,
                                                   random_state=self.seed).fit(x, y)
        self.voxels = int(len(y))
        return self

    def predict(self, store) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{self.role}: fit the reference before predicting")
        g, name = _open(store)
        with naming(name):
            brain = np.asarray(g["brain"][...]) > 0
            x = voxel_features(g["input"][...])[brain]
        out = np.zeros(brain.shape, np.float32)
        out[brain] = np.clip(self.model.predict(x), 0.0, 1.0)
        return out

    def to_dict(self) -> dict:
        return {"role": self.role, "voxels": self.voxels, "iterations": self.max_iter,
                "features": 2 * (2 + len(SIGMAS)), "sigmas_px": list(SIGMAS)}
