"""The voxel-regression reference: it learns what the maps carry, and nothing they do not."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage

from train.evaluate.metrics import masked_metrics, to_12bit
from train.evaluate.reference import VoxelRegression, voxel_features


def _store(path, seed, target_of):
    rng = np.random.default_rng(seed)
    shape = (3, 32, 32)
    brain = np.zeros(shape, np.uint8)
    brain[:, 4:-4, 4:-4] = 1
    # smooth random maps, so neighbourhood features mean something
    x = np.stack([ndimage.gaussian_filter(rng.uniform(0, 1, shape), 1.5, axes=(1, 2)) for _ in range(2)])
    x = (x - x.min()) / (x.max() - x.min()) * brain
    g = zarr.open_group(str(path), mode="w")
    g.create_array("input", data=x.astype(np.float32))
    g.create_array("brain", data=brain)
    g.create_array("t1w", data=(target_of(x, rng) * brain).astype(np.float32))
    g.attrs.update({"site": "site-A", "split": "train"})
    return path


def _ssim(pred, path):
    g = zarr.open_group(str(path), mode="r")
    return masked_metrics(to_12bit(pred), to_12bit(g["t1w"][...]), g["brain"][...] > 0)["ssim"]


def test_learns_a_nonlinear_function_of_the_maps(tmp_path):
    def f(x, rng):
        return np.clip(np.exp(-2 * x[0]) * np.sqrt(x[1]), 0, 1)

    train = [_store(tmp_path / f"a{i}.zarr", i, f) for i in range(3)]
    test = _store(tmp_path / "t.zarr", 9, f)
    ref = VoxelRegression("t1w").fit(train)
    pred = ref.predict(test)
    assert pred.dtype == np.float32 and pred.min() >= 0 and pred.max() <= 1
    assert not pred[zarr.open_group(str(test), mode="r")["brain"][...] == 0].any()
    assert _ssim(pred, test) > 0.95
    # same exams, same trees
    np.testing.assert_array_equal(VoxelRegression("t1w").fit(train).predict(test), pred)
    d = ref.to_dict()
    assert d["voxels"] == 3 * 3 * 24 * 24 and d["features"] == voxel_features(np.zeros((2, 1, 8, 8))).shape[-1]


def test_cannot_learn_what_the_maps_do_not_carry(tmp_path):
    def noise(x, rng):
        return ndimage.gaussian_filter(rng.uniform(0, 1, x.shape[1:]), 1.0, axes=(1, 2))

    train = [_store(tmp_path / f"a{i}.zarr", i, noise) for i in range(3)]
    test = _store(tmp_path / "t.zarr", 9, noise)
    g = zarr.open_group(str(test), mode="r")
    brain = g["brain"][...] > 0
    # the brain's border is structure both images share; a constant inside it scores that much
    constant = _ssim(np.where(brain, 0.5, 0.0), test)
    got = _ssim(VoxelRegression("t1w").fit(train).predict(test), test)
    assert got < constant + 0.05


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="T1/T2 input"):
        voxel_features(np.zeros((3, 2, 8, 8)))
    path = _store(tmp_path / "a.zarr", 0, lambda x, rng: x[0])
    with pytest.raises(KeyError, match="no 't2w' array"):
        VoxelRegression("t2w").fit([path])
    with pytest.raises(RuntimeError, match="fit the reference"):
        VoxelRegression("t1w").predict(path)
