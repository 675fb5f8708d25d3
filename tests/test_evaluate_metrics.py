"""The paper's metrics (train.evaluate.metrics) against closed forms, skimage and MONAI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from train.evaluate.metrics import (
    lesion_contrast,
    masked_metrics,
    paired_tests,
    region_metrics,
    ssim_map,
    to_12bit,
)

L = 4095.0
CROP = 5  # (win - 1) // 2 for the 11-tap window; skimage and MONAI both leave this border out


def _pair(seed: int, shape=(64, 72)) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random image on [0, L] and a smoothly perturbed copy."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random(shape), 2)
    a = (a - a.min()) / (a.max() - a.min())
    b = a + 0.05 * ndimage.gaussian_filter(rng.standard_normal(shape), 1)
    return to_12bit(a), to_12bit(b)


def _disc(shape, r) -> np.ndarray:
    yy, xx = np.indices(shape[-2:])
    d = (yy - shape[-2] / 2) ** 2 + (xx - shape[-1] / 2) ** 2 < r * r
    return np.broadcast_to(d, shape).copy()


def test_to_12bit_clips_and_scales():
    out = to_12bit(np.array([-0.2, 0.0, 0.5, 1.0, 1.3], dtype=np.float32))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.0, 0.0, 2047.5, L, L])


def test_identical_images():
    a, _ = _pair(0, (3, 40, 40))
    m = masked_metrics(a, a, _disc(a.shape, 15))
    assert m["mae"] == 0.0
    assert m["psnr"] == math.inf
    assert abs(m["ssim"] - 1.0) < 1e-12
    assert m["voxels"] == int(_disc(a.shape, 15).sum())


def test_constant_offset_inside_mask():
    a, _ = _pair(1)
    mask = _disc(a.shape, 20)
    c = 37.0
    m = masked_metrics(a + c, a, mask)
    assert m["mae"] == pytest.approx(c, rel=0, abs=1e-12)
    assert m["psnr"] == pytest.approx(10 * math.log10(L**2 / c**2), rel=0, abs=1e-12)
    # The offset outside the mask is stripped away, so it does not count.
    assert masked_metrics(a + c * ~mask, a, mask)["mae"] == 0.0


def test_gaussian_noise_mae_and_psnr():
    rng = np.random.default_rng(2)
    shape = (4, 256, 256)
    target = np.full(shape, 2000.0)
    s = 50.0
    pred = target + rng.normal(0, s, shape)
    m = masked_metrics(pred, target, _disc(shape, 120))
    assert m["mae"] == pytest.approx(s * math.sqrt(2 / math.pi), rel=0.02)
    assert m["psnr"] == pytest.approx(10 * math.log10(L**2 / s**2), abs=0.1)


def test_empty_mask_raises():
    a, b = _pair(3)
    with pytest.raises(ValueError, match="empty mask"):
        masked_metrics(a, b, np.zeros(a.shape, bool))


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_ssim_matches_skimage(seed):
    from skimage.metrics import structural_similarity

    a, b = _pair(seed)
    mean, full = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=L, K1=0.01, K2=0.03, full=True,
    )
    ours = ssim_map(a, b)
    np.testing.assert_allclose(ours, full, rtol=0, atol=1e-12)
    # Full mask: our map averaged over the interior is skimage's cropped mean.
    assert masked_metrics(a, b, np.ones(a.shape, bool))["ssim"] == pytest.approx(ours.mean())
    assert ours[CROP:-CROP, CROP:-CROP].mean() == pytest.approx(mean, rel=0, abs=1e-12)


@pytest.mark.parametrize("seed", [7, 8])
def test_ssim_matches_monai(seed):
    torch = pytest.importorskip("torch")
    from monai.metrics.regression import compute_ssim_and_cs

    a, b = _pair(seed)
    ssim, _ = compute_ssim_and_cs(
        torch.tensor(a)[None, None], torch.tensor(b)[None, None], spatial_dims=2,
        kernel_size=(11, 11), kernel_sigma=(1.5, 1.5), data_range=L, kernel_type="gaussian",
        k1=0.01, k2=0.03,
    )
    monai = ssim[0, 0].double().numpy()  # valid (unpadded) convolution: the interior only
    ours = ssim_map(a, b)[CROP:-CROP, CROP:-CROP]
    assert monai.shape == ours.shape
    # MONAI's window is the same as ours (11 taps of exp(-x^2/2s^2), normalised to sum 1, as scipy's
    # truncate=3.5 filter); the gap is only MONAI casting to float32, where E[x^2] - E[x]^2 on a
    # 4095 scale cancels catastrophically: ~2e-4 per pixel at worst, ~1e-6 on the mean.
    np.testing.assert_allclose(monai, ours, rtol=0, atol=1e-3)
    assert monai.mean() == pytest.approx(ours.mean(), rel=0, abs=1e-5)


def test_ssim_is_slice_wise():
    stack = [_pair(s, (40, 48)) for s in (9, 10, 11)]
    a = np.stack([p[0] for p in stack])
    b = np.stack([p[1] for p in stack])
    full = ssim_map(a, b)
    assert full.shape == a.shape
    for z in range(a.shape[0]):
        np.testing.assert_array_equal(full[z], ssim_map(a[z], b[z]))


def test_region_metrics():
    a, b = _pair(12, (2, 48, 48))
    brain = _disc(a.shape, 20)
    half = np.zeros(a.shape, bool)
    half[:, :24] = True
    regions = {"all": brain, "half": half, "empty": np.zeros(a.shape, bool), "outside": ~brain}
    out = region_metrics(a, b, brain, regions)
    assert set(out) == {"all", "half"}
    assert out["all"] == masked_metrics(a, b, brain)
    # A region is averaged from the brain-wide SSIM map, not from a region-cut image.
    expected = ssim_map(a * brain, b * brain)[half & brain].mean()
    assert out["half"]["ssim"] == pytest.approx(expected, rel=0, abs=1e-15)
    assert out["half"]["voxels"] == int((half & brain).sum())


def test_lesion_contrast():
    img = np.array([[10.0, 10.0, 30.0], [20.0, 0.0, 0.0]])
    lesion = np.array([[0, 0, 1], [1, 0, 0]], bool)  # mean 25
    ref = np.array([[1, 1, 0], [0, 0, 0]], bool)  # mean 10
    assert lesion_contrast(img, lesion, ref) == pytest.approx(1.5)
    assert lesion_contrast(img, np.zeros_like(lesion), ref) is None
    assert lesion_contrast(img, lesion, np.zeros_like(ref)) is None
    zero_ref = np.array([[0, 0, 0], [0, 1, 1]], bool)
    assert lesion_contrast(img, lesion, zero_ref) is None


def test_paired_tests_clear_difference():
    rng = np.random.default_rng(13)
    b = rng.normal(0.80, 0.02, 10)
    a = b + 0.05 + rng.normal(0, 0.005, 10)
    a[3] = np.nan  # dropped with its pair
    r = paired_tests(a, b)
    assert r["n"] == 9
    assert r["mean_diff"] == pytest.approx(np.nanmean(a - b))
    assert r["wilcoxon_p"] < 0.01 and r["ttest_p"] < 1e-6
    json.dumps(r)
    assert all(type(v) in (int, float) for v in r.values())


def test_paired_tests_degenerate_cases():
    x = [0.93, 0.81, 0.87, 0.71]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = paired_tests(x, x)
        shifted = paired_tests(np.add(x, 0.07), x)  # differences equal only up to rounding
        one = paired_tests([0.9], [0.8])
    assert same["wilcoxon_p"] is None and same["ttest_p"] is None
    assert same["mean_diff"] == 0.0
    assert shifted["ttest_p"] is None  # constant differences: no spread, no t-test
    assert shifted["wilcoxon_p"] is not None
    assert one["n"] == 1 and one["wilcoxon_p"] is None and one["ttest_p"] is None
    json.dumps([same, shifted, one])
