from __future__ import annotations

import numpy as np
import pytest
import zarr

from ingest.phantom.physics import TISSUE_PARAMS
from ingest.prepare.grid import apply_scale
from ingest.siteconfig import load_site
from train.evaluate.physics import PhysicsBaseline, PhysicsUnavailable, exam_signal, signal

ROLES = ("t1w", "t2w", "t1flair", "t2flair", "swi")
T1_SCALE = {"lo": 500.0, "hi": 4500.0, "units": "ms"}
T2_SCALE = {"lo": 40.0, "hi": 2000.0, "units": "ms"}


def _tissue(name):
    t1, t2, _t2s, _pd = TISSUE_PARAMS[name]
    return np.array([t1]), np.array([t2])


@pytest.mark.parametrize("site", ["site-A", "site-B"])
def test_signal_tissue_ordering(site):
    series = load_site(site)["series"]
    s = {role: {t: float(signal(*_tissue(t), series[role])[0]) for t in ("wm", "gm", "csf")} for role in ROLES}
    assert s["t1w"]["wm"] > s["t1w"]["gm"] > s["t1w"]["csf"]
    assert s["t2w"]["csf"] > s["t2w"]["gm"] > s["t2w"]["wm"]
    assert s["t2flair"]["csf"] < min(s["t2flair"]["gm"], s["t2flair"]["wm"])
    for role in ROLES:
        assert all(v >= 0 for v in s[role].values())


def _store(path, site="site-A", split="train", targets=None, seed=0, shape=(3, 12, 12)):
    """A tiny prepared store: smooth-ish T1/T2 maps in a box-shaped brain."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, np.uint8)
    brain[:, 2:-2, 2:-2] = 1
    t1 = rng.uniform(700, 4300, shape)
    t2 = np.clip(t1 / 15 + rng.normal(0, 10, shape), 45, 1900)
    x = np.stack([apply_scale(t1, T1_SCALE["lo"], T1_SCALE["hi"], brain),
                  apply_scale(t2, T2_SCALE["lo"], T2_SCALE["hi"], brain)])
    g = zarr.open_group(str(path), mode="w")
    g.create_array("input", data=x.astype(np.float32))
    g.create_array("brain", data=brain)
    for role, vol in (targets or {}).items():
        g.create_array(role, data=np.asarray(vol, np.float32))
    g.attrs.update({"site": site, "split": split, "scale": {"mrf_t1": T1_SCALE, "mrf_t2": T2_SCALE}})
    return g


@pytest.mark.parametrize("role", ["t1w", "t2flair"])
def test_fit_recovers_known_mapping(tmp_path, role):
    a, b = 0.7, 0.15
    stores = []
    for i in range(2):
        path = tmp_path / f"train{i}.zarr"
        g = _store(path, seed=i)
        brain = np.asarray(g["brain"][...]) > 0
        target = np.where(brain, a * exam_signal(path, role).astype(np.float64) + b, 0.0)
        g.create_array(role, data=target.astype(np.float32))
        stores.append(path if i == 0 else zarr.open_group(str(path), mode="r"))  # paths and groups
    base = PhysicsBaseline(role).fit(stores)
    assert base.a == pytest.approx(a, rel=1e-6)
    assert base.b == pytest.approx(b, rel=1e-6)
    d = base.to_dict()
    assert d["role"] == role and d["voxels"] == 2 * int(brain.sum())

    pred = base.predict(stores[0])
    g = zarr.open_group(str(stores[0]), mode="r")
    brain = np.asarray(g["brain"][...]) > 0
    assert pred.dtype == np.float32 and pred.shape == brain.shape
    np.testing.assert_allclose(pred[brain], g[role][...][brain], rtol=1e-5, atol=1e-6)
    assert not pred[~brain].any()


def test_exam_signal_normalised_and_other_site(tmp_path):
    path = tmp_path / "a.zarr"
    g = _store(path)
    brain = np.asarray(g["brain"][...]) > 0
    s = exam_signal(path, "t2w")
    assert s.shape == brain.shape and s.dtype == np.float32
    assert s[brain].min() == 0.0 and s[brain].max() == 1.0 and not s[~brain].any()
    # the same maps under site-B's protocol: a different image
    assert not np.allclose(exam_signal(path, "t1w", site_config=load_site("site-B")), exam_signal(path, "t1w"))


def test_unknown_site_unavailable(tmp_path):
    path = tmp_path / "nosite.zarr"
    _store(path, site="site-Z", targets={"t1w": np.zeros((3, 12, 12))})
    with pytest.raises(PhysicsUnavailable, match="nosite.zarr"):
        exam_signal(path, "t1w")
    with pytest.raises(PhysicsUnavailable, match="site-Z"):
        PhysicsBaseline("t1w").fit([path])
    cfg = dict(load_site("site-A"))
    cfg["series"] = {k: v for k, v in cfg["series"].items() if k != "swi"}
    with pytest.raises(PhysicsUnavailable, match="swi"):
        exam_signal(path, "swi", site_config=cfg)


def test_fit_without_voxels(tmp_path):
    with pytest.raises(ValueError, match="no brain voxels"):
        PhysicsBaseline("t1w").fit([])
