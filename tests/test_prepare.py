"""The prepare stage on phantom exams: registration, brain mask, inversion, bad input, splits."""

from __future__ import annotations

import json
import os
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for niftiref
from niftiref import reindexed  # noqa: E402

from ingest.prepare.grid import denormalise, normalise, resample, standard_grid, to_native
from ingest.prepare.service import (ExamTask, PrepareError, assign_splits, config, contract_mismatch, input_contract,
                                    prepare, prepare_exam, prepare_inputs)
from ingest.store import open_store, write_exam_store

CFG = config({"prepare": {"image_size": 64}, "seed": 0})


def rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    m = np.eye(4)
    m[i, i] = m[j, j] = c
    m[i, j], m[j, i] = -s, s
    return m


def copy_store(src: Path, dst: Path, edit=None) -> Path:
    """A raw store copy, optionally with arrays/attrs changed by edit(arrays, group_attrs)."""
    st = open_store(src)
    arrays = {r: (st.read(r), {k: v for k, v in st.attrs_of(r).items() if k != "sha256"}) for r in st.roles}
    group = {k: v for k, v in st.attrs.items() if k != "schema_version"}
    if edit:
        edit(arrays, group)
    write_exam_store(dst, arrays, group)
    return dst


def run_exam(raw: Path, tmp: Path, name: str = "x") -> dict:
    task = ExamTask(str(raw), str(tmp / "prep" / f"{name}.zarr"), "site-A", name, "train", "d", "")
    return prepare_exam(task, CFG)


@pytest.fixture(scope="module")
def prepared_pair(raw_pair, tmp_path_factory):
    """Both phantom exams through the whole stage (report, stores, figures)."""
    root = tmp_path_factory.mktemp("prep")
    src = root / "raw"
    for site, p in raw_pair.items():
        shutil.copytree(p, src / site / p.name)
    rep = prepare(src, root / "prepared", root / "prepare.json", {"prepare": {"image_size": 64}, "seed": 0,
                                                                   "profile": "demo"}, jobs=2, figures=root / "fig")
    return root, rep


def test_stage_prepares_both_sites(prepared_pair):
    root, rep = prepared_pair
    assert rep["summary"]["prepared"] == 2, rep["excluded"]
    for key, e in rep["exams"].items():
        assert e["status"] == "prepared"
        # registration recovers the simulator's between-series motion, and the mask the brain
        assert e["registration_error_mm"] < 1.0, (key, e["registration"])
        assert all(r["error_mm"] < 1.0 for r in e["registration"].values())
        assert e["brain_dice"] >= 0.95
        assert Path(e["figure"]).stat().st_size > 1000
        st = open_store(root / "prepared" / f"{key}.zarr")
        assert st.array("input").shape[:2] == (2, e["native_shape"][0])
        assert st.array("input").shape[-2:] == (64, 64)
        for role in ("t1w", "t2w", "t1flair", "t2flair", "swi"):
            v = st.read(role)
            assert v.shape == st.array("brain").shape and 0 <= v.min() and v.max() <= 1
            assert (v[st.read("brain") == 0] == 0).all()
            valid = st.read(f"valid_{role}") > 0
            assert not (valid & (st.read("brain") == 0)).any() and (v[~valid] == 0).all()
        assert st.attrs["split"] == e["split"] and "inversion" in st.attrs and "scale" in st.attrs
    # the report is the DVC metrics file: plain JSON with the summary numbers
    assert json.loads((root / "prepare.json").read_text())["summary"]["brain_dice_mean"] >= 0.95
    assert json.loads((root / "prepare_summary.json").read_text())["brain_dice_mean"] >= 0.95


def test_rerun_reuses_unchanged_exams(prepared_pair):
    root, rep = prepared_pair
    before = {p: p.stat().st_mtime_ns for p in (root / "prepared").rglob("*") if p.is_file()}
    params = {"prepare": {"image_size": 64}, "seed": 0, "profile": "demo"}
    (root / "prepare.json").unlink()  # as DVC does before it runs a stage: the stores alone remember
    again = prepare(root / "raw", root / "prepared", root / "prepare.json", params, jobs=1, figures=root / "fig")
    assert all(e["reused"] for e in again["exams"].values())
    assert again["summary"]["brain_dice_mean"] == rep["summary"]["brain_dice_mean"]
    assert all(e["figure"] == rep["exams"][k]["figure"] for k, e in again["exams"].items())
    assert {p: p.stat().st_mtime_ns for p in (root / "prepared").rglob("*") if p.is_file()} == before


def test_an_exam_that_left_takes_its_store_and_figure_with_it(prepared_pair, tmp_path):
    root, rep = prepared_pair
    for part in ("raw", "prepared", "fig"):
        shutil.copytree(root / part, tmp_path / part)
    shutil.copy(root / "prepare.json", tmp_path / "prepare.json")
    gone = sorted((tmp_path / "raw").glob("*/*.zarr"))[0]
    shutil.rmtree(gone)
    (tmp_path / "fig" / "evaluate").mkdir()
    (tmp_path / "fig" / "evaluate" / "boxplot.png").write_bytes(b"another stage's")   # a shared --figures folder
    params = {"prepare": {"image_size": 64}, "seed": 0, "profile": "demo"}
    again = prepare(tmp_path / "raw", tmp_path / "prepared", tmp_path / "prepare.json", params, jobs=1,
                    figures=tmp_path / "fig")
    left = f"{gone.parent.name}/{gone.stem}"
    assert left not in again["exams"] and len(again["exams"]) == 1
    assert not (tmp_path / "prepared" / f"{left}.zarr").exists()
    assert not (tmp_path / "fig" / f"{left}.png").exists()
    assert len(list((tmp_path / "fig").glob("site-*/*.png"))) == 1
    assert (tmp_path / "fig" / "evaluate" / "boxplot.png").exists()


def test_same_inputs_give_byte_identical_stores(prepared_pair):
    """A prepared store holds no wall-clock time: prepared again from the same raw stores, every
    file is the same, so DVC has nothing to retrain after a rerun of prepare."""
    root, _ = prepared_pair
    params = {"prepare": {"image_size": 64}, "seed": 0, "profile": "demo"}
    prepare(root / "raw", root / "again", root / "again.json", params, jobs=2, figures=root / "fig")
    first = {p.relative_to(root / "prepared"): p.read_bytes() for p in (root / "prepared").rglob("*") if p.is_file()}
    again = {p.relative_to(root / "again"): p.read_bytes() for p in (root / "again").rglob("*") if p.is_file()}
    assert first.keys() == again.keys()
    assert [k for k in first if first[k] != again[k]] == []
    # the timings are in the report
    assert all("elastix_s" in e for e in json.loads((root / "again.json").read_text())["exams"].values())


def test_a_series_that_misses_slices_leaves_them_without_truth(prepared_pair, raw_pair, tmp_path):
    """A T2w slab shorter than the MRF one (its first 3 slices, 13 mm, cut off): the MRF slices
    it misses have no truth (valid_t2w), instead of a black brain that training would learn
    and the metrics score; the scale comes from the covered brain only; the slices it covers
    are prepared as before."""
    def edit(arrays, group):
        vol, a = arrays["t2w"]
        aff = np.asarray(a["affine_lps"], float)
        a["affine_lps"] = (aff @ np.array([[1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])).tolist()
        arrays["t2w"] = (vol[3:], a)

    raw = copy_store(raw_pair["site-A"], tmp_path / "short.zarr", edit)
    # the quality gate would exclude a series covering under 80 % of the brain; this one covers about 74 %
    cfg = {**CFG, "registration": {**CFG["registration"], "min_coverage": 0.6}}
    e = prepare_exam(ExamTask(str(raw), str(tmp_path / "prep" / "x.zarr"), "site-A", "x", "train", "d", ""), cfg)
    assert e["status"] == "prepared", e.get("reason")
    root, _ = prepared_pair
    full = open_store(next((root / "prepared" / "site-A").glob("*.zarr")))
    cut = open_store(tmp_path / "prep" / "x.zarr")
    brain, valid = cut.read("brain") > 0, cut.read("valid_t2w") > 0
    per_slice = [(brain[z].sum(), (brain[z] & valid[z]).sum()) for z in range(brain.shape[0])]
    assert any(b > 50 and v == 0 for b, v in per_slice), per_slice      # whole brain slices without truth
    assert (cut.read("t2w")[~valid] == 0).all()
    lo_full, lo_cut = full.attrs["scale"]["t2w"]["lo"], cut.attrs["scale"]["t2w"]["lo"]
    assert lo_cut > 0.8 * lo_full > 0, (lo_cut, lo_full)               # not the black slices' 0
    both = valid & (full.read("valid_t2w") > 0)
    assert np.abs(cut.read("t2w")[both] - full.read("t2w")[both]).mean() < 0.02


@pytest.mark.parametrize("axis", ["x", "z"])
def test_registration_recovers_known_misalignment(raw_pair, tmp_path, axis):
    """The subject moves 10 degrees and 10 mm before the T1w series: recovered within 1 mm."""
    move = rot(axis, 10.0)
    move[:3, 3] = [10.0 / math.sqrt(3)] * 3

    def edit(arrays, group):
        vol, a = arrays["t1w"]
        a["affine_lps"] = (move @ np.asarray(a["affine_lps"])).tolist()
        pose = group["phantom_truth"]["series"]["t1w"]
        pose["pose_head_to_lps"] = (move @ np.asarray(pose["pose_head_to_lps"])).tolist()

    raw = copy_store(raw_pair["site-A"], tmp_path / "moved.zarr", edit)
    e = run_exam(raw, tmp_path)
    assert e["status"] == "prepared", e.get("reason")
    r = e["registration"]["t1w"]
    assert r["rotation_deg"] > 8.0  # it really had to move
    assert r["error_mm"] < 1.0, r


def test_registration_is_deterministic(raw_pair, tmp_path):
    from ingest.prepare.register import rigid_register

    st = open_store(raw_pair["site-B"])
    args = (st.read("mrf_t1"), st.attrs_of("mrf_t1")["affine_lps"], st.read("t2w"), st.attrs_of("t2w")["affine_lps"],
            CFG["registration"])
    assert np.array_equal(rigid_register(*args), rigid_register(*args))


def test_inversion_round_trip(prepared_pair, raw_pair):
    root, rep = prepared_pair
    key = next(k for k in rep["exams"] if k.startswith("site-B"))  # 55 x 55 native -> 64 x 64
    st = open_store(root / "prepared" / f"{key}.zarr")
    raw = open_store(raw_pair["site-B"])
    inv, scale = st.attrs["inversion"], st.attrs["scale"]
    assert scale["mrf_t1"] == {"rate_ms": 250.0, "units": "ms"}   # the default: rates on a fixed scale
    t1_back, aff = to_native(st.read("input")[0], inv, scale["mrf_t1"])
    native = raw.read("mrf_t1")
    assert t1_back.shape == native.shape
    assert np.array_equal(np.round(aff, 6), np.round(np.asarray(raw.attrs_of("mrf_t1")["affine_lps"]), 6))
    # inside the brain (away from its edge, where the mask cuts), within the interpolation error:
    # 55 -> 64 -> 55 in plane across the phantom's sharp tissue edges costs about 7% (median)
    from scipy import ndimage as ndi

    core = ndi.binary_erosion(raw.read("brain") > 0, iterations=2) & (native > 250.0)
    rel = np.abs(t1_back[core] - native[core]) / native[core]
    assert np.median(rel) < 0.1, np.median(rel)


@pytest.mark.parametrize("scale", [{"rate_ms": 250.0}, {"lo": 500.0, "hi": 4500.0}])
def test_normalise_inverts_inside_its_range(scale):
    t = np.array([[0.0, 100.0, 600.0, 1000.0, 4000.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]])
    x = normalise(t, scale, mask)
    assert x.min() >= 0 and x.max() <= 1 and x[0, 4] == 0            # outside the mask: 0
    back = denormalise(x, scale, mask)
    np.testing.assert_allclose(back[0, 2:4], t[0, 2:4], rtol=1e-5)   # unclipped voxels come back
    if "rate_ms" in scale:   # a faster rate than the scale's end is clipped, an unmeasured voxel stays 0
        np.testing.assert_allclose(x[0, :4], [0.0, 1.0, 250 / 600, 0.25], rtol=1e-6)
        assert back[0, 0] == 0 and back[0, 1] == 250.0


def test_rate_scale_of_a_subnormal_time_is_quiet():
    """Resampling leaves subnormal times at the head's edge: ref / x overflows there, which is
    clipped to the scale's end, and must not print numpy's overflow warning into every log."""
    import warnings

    t = np.array([0.0, 1e-42, 500.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = normalise(t, {"rate_ms": 250.0})
    np.testing.assert_allclose(x, [0.0, 1.0, 0.5])


def test_input_scaling_is_fixed_or_per_exam(raw_pair):
    """Rates: the T2 map doubled gives half the input (absolute T2 reaches the model);
    percentiles (a model card that predates the choice): the same input either way. (T2, as
    the brain mask comes from T1 and would change with it.)"""
    st = open_store(raw_pair["site-A"])
    t1, t2, aff = st.read("mrf_t1"), st.read("mrf_t2"), st.attrs_of("mrf_t1")["affine_lps"]
    for kind, same in (("rate", False), ("percentiles", True)):
        norm = {"percentiles": [0.5, 99.5]} if kind == "percentiles" else CFG["normalise"]
        cfg = {**CFG, "normalise": norm}
        a = prepare_inputs(t1, t2, aff, aff, cfg)
        b = prepare_inputs(t1, 2 * t2, aff, aff, cfg)
        assert np.array_equal(a["brain"], b["brain"])
        core = a["brain"] & (a["input"][1] > 0) & (a["input"][1] < 1)
        assert np.allclose(a["input"][1][core], b["input"][1][core], atol=1e-5) == same, kind
        if not same:
            np.testing.assert_allclose(b["input"][1][core], a["input"][1][core] / 2, rtol=1e-4, atol=1e-6)


def test_contract_mismatch_names_both_scalings():
    rate = input_contract(CFG)
    old = {**rate, "normalise": {"percentiles": [0.5, 99.5]}}   # a card from before the option
    assert contract_mismatch(rate, rate) is None and contract_mismatch(old, old) is None
    # a card from before cards carried a contract: its inputs' scaling and geometry are unknown
    assert "records no input contract" in contract_mismatch(None, rate)
    assert contract_mismatch(None, None) is None                  # nothing on either side to compare
    why = contract_mismatch(old, rate)
    assert "percentiles [0.5, 99.5]" in why and "rates (mrf_t1 250 ms, mrf_t2 20 ms / T)" in why
    other = {**rate, "normalise": {**rate["normalise"], "rate_ms": {"mrf_t1": 500, "mrf_t2": 20}}}
    assert "mrf_t1 500 ms" in contract_mismatch(other, rate)
    # the settings that do not change what an input value means do not count
    assert contract_mismatch({**rate, "mrf_check": {"max_bad_fraction": 0.5}}, rate) is None
    # pixels of another size: the network would run on them, and synthesise at the wrong scale
    why = contract_mismatch(rate, {**rate, "image_size": 2 * rate["image_size"]})
    assert f"trained on {rate['image_size']} x {rate['image_size']}" in why
    # pixels of another size in mm: the same head would be another size to the model
    assert "trained on 4 mm pixels, the stores hold 2 mm pixels" in contract_mismatch(rate, {**rate, "pixel_mm": 2.0})
    assert "pixels spanning each exam's field of view" in contract_mismatch(
        rate, {k: v for k, v in rate.items() if k != "pixel_mm"})
    # slices in another index order: a 2D model would read them as a turned picture
    before = {k: v for k, v in rate.items() if k != "orientation"}   # a card from before prepare version 2
    why = contract_mismatch(before, rate)
    assert "own voxel order" in why and "towards SPL" in why and "retrain" in why
    assert contract_mismatch(before, before) is None and contract_mismatch(rate, {**rate, "orientation": "SPL"}) is None


@pytest.mark.parametrize("norm, why", [({"inputs": "zscore"}, "expected 'rate' or 'percentiles'"),
                                       ({"inputs": "rate", "rate_ms": {"mrf_t2": -1}}, "for mrf_t2"),
                                       ({"inputs": "rate", "rate_ms": {"mrf_t1": 0, "mrf_t2": 20}}, "for mrf_t1")])
def test_bad_input_scaling_is_refused(norm, why):
    with pytest.raises(PrepareError, match=why):
        config({"prepare": {"normalise": norm}})


def test_slab_average_is_not_a_point_sample():
    """A 1 mm stripe pattern through a 5 mm slice averages out; a point sample would not."""
    fine = np.zeros((50, 8, 8), np.float32)
    fine[::2] = 1.0                                       # alternating 1 mm slices
    fine_aff = np.eye(4)
    out_aff = np.diag([5.0, 1.0, 1.0, 1.0])
    out_aff[0, 3] = 12.0
    v, cover = resample(fine, fine_aff, (5, 8, 8), out_aff)
    assert np.allclose(v[1:4], 0.5, atol=0.11) and cover[1:4].min() == 1.0
    axial = np.array([[0, 0, 1.0, -27], [0, 1.0, 0, -27], [5.0, 0, 0, 12], [0, 0, 0, 1]])   # (z, y, x) -> (S, P, L)
    shape, aff = standard_grid((5, 55, 55), axial, 64)
    assert shape == (5, 64, 64)
    # the prepared grid covers the same field of view: its pixel edges meet the native ones
    assert np.allclose(aff @ [0, -0.5, -0.5, 1], axial @ [0, -0.5, -0.5, 1])
    assert np.allclose(aff @ [0, 63.5, 63.5, 1], axial @ [0, 54.5, 54.5, 1])


def test_target_slices_are_slabs_weighted_by_their_overlap():
    """A target series on the MRF's own 5 mm slices comes back as it is: its slices are slabs,
    not points to interpolate between and then average over 5 mm again (which put a quarter of
    each slice into its neighbours). A 6.5 mm slab weighs in by its overlap with each 5 mm one."""
    out_aff = np.diag([5.0, 1.0, 1.0, 1.0])
    one = np.zeros((9, 8, 8), np.float32)
    one[4] = 1.0
    v, cover = resample(one, out_aff, one.shape, out_aff, slabs=True)
    assert np.array_equal(v[:, 4, 4], one[:, 4, 4]) and cover.min() == 1.0
    blurred, _ = resample(one, out_aff, one.shape, out_aff)
    assert blurred[3, 4, 4] > 0.1   # the point model this replaces
    thick = np.zeros((8, 8, 8), np.float32)
    thick[3] = 1.0                                        # 16.25-22.75 mm
    v, _ = resample(thick, np.diag([6.5, 1.0, 1.0, 1.0]), (10, 8, 8), out_aff, slabs=True)
    overlap = [max(0.0, min(22.75, 5 * k + 2.5) - max(16.25, 5 * k - 2.5)) / 5 for k in range(10)]
    assert np.allclose(v[:, 4, 4], overlap, atol=0.2)     # 5 samples through each 5 mm slab


@pytest.mark.parametrize("how", ["rows flipped", "columns flipped", "transposed", "slices reversed"])
def test_prepared_input_does_not_depend_on_the_stored_voxel_order(raw_pair, how):
    """The same head stored in another row, column or slice order (another vendor, phase-encoding
    direction or patient position) must give the model the same input, or a 2D model reads it
    as a different head; and the result goes back onto the upload's own voxel order."""
    st = open_store(raw_pair["site-B"])
    t1, t2, aff = st.read("mrf_t1"), st.read("mrf_t2"), st.attrs_of("mrf_t1")["affine_lps"]
    a = prepare_inputs(t1, t2, aff, aff, CFG)
    t1b, affb = reindexed(t1, aff, how)
    t2b, _ = reindexed(t2, aff, how)
    b = prepare_inputs(t1b, t2b, affb, affb, CFG)
    assert b["shape"] == a["shape"]
    np.testing.assert_allclose(b["affine"], a["affine"], atol=1e-6)
    assert (a["brain"] != b["brain"]).sum() <= 2
    np.testing.assert_allclose(b["input"], a["input"], atol=1e-4)
    back_a, _ = to_native(a["input"][0], a["inversion"])
    back_b, native_b = to_native(b["input"][0], b["inversion"])
    np.testing.assert_allclose(native_b, affb)
    np.testing.assert_allclose(back_b, reindexed(back_a, aff, how)[0], atol=1e-4)


@pytest.mark.parametrize("pad, why", [(((0, 0), (8, 8), (8, 8)), None),      # a larger field of view
                                      (((0, 0), (0, 0), (20, 20)), None),     # wider than tall
                                      (((0, 0), (0, 0), (0, 40)), "the brain reaches outside the prepared 256 mm")])
def test_prepared_pixels_keep_their_size_whatever_the_field_of_view(raw_pair, pad, why):
    """The same head in a larger or non-square field of view gives the model the same input: over
    each exam's own field of view it would see the head shrunk or squashed. A head that the fixed
    field of view would cut is refused, not cropped."""
    st = open_store(raw_pair["site-B"])
    t1, t2 = st.read("mrf_t1"), st.read("mrf_t2")
    aff = np.asarray(st.attrs_of("mrf_t1")["affine_lps"], float)
    a = prepare_inputs(t1, t2, aff, aff, CFG)
    shift = np.eye(4)
    shift[:3, 3] = [-before for before, _ in pad]
    big = aff @ shift                                     # index 0 of the padded volume lies `before` voxels out
    t1b, t2b = (np.pad(v, pad) for v in (t1, t2))
    if why:
        with pytest.raises(PrepareError, match=why):
            prepare_inputs(t1b, t2b, big, big, CFG)
        return
    b = prepare_inputs(t1b, t2b, big, big, CFG)
    np.testing.assert_allclose(b["affine"], a["affine"], atol=1e-6)
    assert np.allclose(np.linalg.norm(b["affine"][:3, 1:3], axis=0), 256 / 64)
    np.testing.assert_allclose(b["input"], a["input"], atol=1e-5)
    assert (a["brain"] == b["brain"]).all()


def test_maps_in_sagittal_slices_are_refused(raw_pair):
    st = open_store(raw_pair["site-B"])
    t1, t2, aff = st.read("mrf_t1"), st.read("mrf_t2"), np.asarray(st.attrs_of("mrf_t1")["affine_lps"], float)
    sag = aff[:, [2, 1, 0, 3]]        # the slice axis now runs left-right
    with pytest.raises(PrepareError, match="mrf_t1: the slices are not axial: the slice axis runs left-right"):
        prepare_inputs(t1, t2, sag, sag, CFG)


@pytest.mark.parametrize("case", ["missing_role", "nan_map", "negative_map", "diverged", "empty_brain"])
def test_bad_exams_are_excluded_with_a_reason(raw_pair, tmp_path, case):
    def edit(arrays, group):
        if case == "missing_role":
            del arrays["t2flair"]
        elif case == "nan_map":
            arrays["mrf_t2"][0][:] = np.nan
        elif case == "negative_map":
            arrays["mrf_t1"] = (-np.abs(arrays["mrf_t1"][0]) - 1, arrays["mrf_t1"][1])
        elif case == "diverged":
            vol, a = arrays["swi"]
            arrays["swi"] = (np.random.default_rng(0).random(vol.shape).astype(np.float32), a)
        elif case == "empty_brain":
            arrays["mrf_t1"] = (np.minimum(arrays["mrf_t1"][0], 500.0), arrays["mrf_t1"][1])

    raw = copy_store(raw_pair["site-A"], tmp_path / "bad.zarr", edit)
    e = run_exam(raw, tmp_path)
    assert e["status"] == "excluded"
    expect = {"missing_role": "missing role(s) t2flair", "nan_map": "mrf_t2: 100% of voxels are NaN",
              # noise shares no structure with the T1 map: the gate must say so whatever the
              # registration does with it (a gain-only gate passed it on 3 of 4 noise draws)
              "negative_map": "mrf_t1: 100% of voxels are negative",
              "diverged": "swi: registration failed the quality gate: normalised mutual information 1.00",
              "empty_brain": "brain mask empty"}[case]
    assert expect in e["reason"], e["reason"]
    assert "\n" not in e["reason"]
    assert not (tmp_path / "prep" / "x.zarr").exists()


def test_cli_strict_and_the_others_still_prepared(raw_pair, tmp_path):
    src = tmp_path / "raw"
    shutil.copytree(raw_pair["site-B"], src / "site-B" / raw_pair["site-B"].name)
    copy_store(raw_pair["site-A"], src / "site-A" / "sub-broken.zarr",
               lambda arrays, group: arrays.pop("t1w"))
    params = tmp_path / "params.yaml"
    params.write_text("profile: demo\nseed: 0\ndemo:\n  prepare:\n    image_size: 32\n")
    cmd = [sys.executable, "-m", "ingest", "prepare", str(src), str(tmp_path / "out"), "--report",
           str(tmp_path / "r.json"), "--figures", str(tmp_path / "fig"), "--params", str(params), "--jobs", "1"]
    res = subprocess.run(cmd + ["--strict"], capture_output=True, text=True)
    assert res.returncode == 1
    assert "excluded site-A/" in res.stderr and "missing role(s) t1w" in res.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["summary"]["prepared"] == 1 and rep["summary"]["excluded"] == 1
    assert open_store(next((tmp_path / "out" / "site-B").glob("*.zarr"))).array("input").shape[-2:] == (32, 32)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    bad = subprocess.run(cmd[:-2] + ["--profile", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "profile 'nope' not found" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_splits_follow_the_paper_proportions():
    exams = [("site-A", f"sub-a{i:02d}", "healthy") for i in range(32)] + \
            [("site-B", f"sub-b{i:02d}", "gbm") for i in range(18)]
    s = assign_splits(exams, CFG)
    count = lambda site, name: sum(1 for (st, _), v in s.items() if st == site and v == name)  # noqa: E731
    assert count("site-A", "train") + count("site-A", "val") == 20 and count("site-A", "test") == 12
    assert count("site-B", "finetune") + count("site-B", "val") == 9 and count("site-B", "test") == 9
    assert count("site-A", "val") >= 1 and count("site-B", "val") >= 1
    assert assign_splits(exams, CFG) == s
    # excluding or adding exams of one site never re-deals the other site
    s2 = assign_splits(exams[:32] + exams[33:], CFG)
    assert all(s2[k] == v for k, v in s.items() if k[0] == "site-A")


def test_visits_of_one_patient_share_a_split():
    """Splits are dealt per patient: a second visit never lands in the test split while the
    first trains. With one exam per patient the split is the per-exam one."""
    exams = [("site-B", f"sub-b{i:02d}", "gbm", f"pat-{i:02d}") for i in range(18)]
    single = assign_splits(exams, CFG)
    assert single == assign_splits([e[:3] for e in exams], CFG)
    visits = exams + [("site-B", f"sub-v{i:02d}", "gbm", f"pat-{i:02d}") for i in range(0, 18, 2)]
    s = assign_splits(visits, CFG)
    for i in range(0, 18, 2):
        assert s[("site-B", f"sub-v{i:02d}")] == s[("site-B", f"sub-b{i:02d}")]
    train = {e[3] for e in visits if s[e[:2]] in ("finetune", "val")}
    assert train.isdisjoint({e[3] for e in visits if s[e[:2]] == "test"})


def test_a_slice_on_the_edge_of_the_volume_is_not_lost_to_rounding():
    """A grid whose slices fall on the native ones up to floating-point error keeps every
    slice: scipy's "constant" mode drops a point 1e-14 past the last voxel centre."""
    vol = np.ones((4, 6, 6), np.float32)
    aff = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    for eps in (-1e-4, -1e-12, 0.0, 1e-12, 1e-4):   # mm: float rounding, an affine kept to 6 decimals
        out_aff = aff.copy()
        out_aff[2, 3] += eps          # the slices, a rounding error apart
        v, cover = resample(vol, aff, vol.shape, out_aff, footprint_mm=[0, 0, 0])
        assert v.min() == 1.0 and cover.min() == 1.0, eps
    v, _ = resample(vol, aff, vol.shape, out_aff @ [[1, 0, 0, -1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                    footprint_mm=[0, 0, 0])
    assert v[0].max() == 0.0 and v[1:].min() == 1.0    # a slice truly outside stays empty


@pytest.mark.parametrize("how", ["rows flipped", "columns flipped", "transposed", "slices reversed"])
def test_canonical_grid_of_a_non_square_oblique_grid(how):
    """Any stored order of one grid (oblique, rows and columns of different lengths) gives one
    canonical grid: the same shape and the same affine, so the same voxels in the same places."""
    from ingest.prepare.grid import canonical_grid

    axial = np.array([[0, 0, 0.9, -60], [0, 1.1, 0, -70], [4.0, 0, 0, -20], [0, 0, 0, 1]])
    aff = rot("x", 12) @ rot("z", -7) @ axial
    vol = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    shape, want = canonical_grid(vol.shape, aff)
    assert shape == (3, 5, 7)
    np.testing.assert_allclose(want, aff)           # already (S, P, L): nothing to change
    other, other_aff = reindexed(vol, aff, how)
    got_shape, got = canonical_grid(other.shape, other_aff)
    assert got_shape == shape
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_a_source_without_exam_stores_is_refused_and_nothing_is_removed(prepared_pair, tmp_path):
    """A wrong SRC (a site folder, an empty mount) is a failed request: going on would take every
    prepared store for the store of a removed exam and delete it."""
    root, _ = prepared_pair
    before = sorted(p.name for p in (root / "prepared").glob("*/*.zarr"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no <site>/<subject>.zarr exam stores there"):
        prepare(tmp_path / "empty", root / "prepared", tmp_path / "r.json", {"prepare": {"image_size": 64}, "seed": 0})
    assert sorted(p.name for p in (root / "prepared").glob("*/*.zarr")) == before


def test_a_failure_that_is_not_the_data_is_tried_again(raw_pair, tmp_path, monkeypatch):
    """A full disk is not a property of the exam: the next run prepares it instead of reusing the
    exclusion as it does for an exam the quality gate refused."""
    import ingest.prepare.service as svc

    src = tmp_path / "raw"
    shutil.copytree(raw_pair["site-B"], src / "site-B" / raw_pair["site-B"].name)
    real, calls = svc._prepare, []

    def full_disk_once(task, cfg):
        calls.append(task.subject)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(task, cfg)

    monkeypatch.setattr(svc, "_prepare", full_disk_once)
    params = {"prepare": {"image_size": 64}, "seed": 0, "profile": "demo"}
    first = prepare(src, tmp_path / "out", tmp_path / "r.json", params, jobs=1)
    assert first["summary"]["excluded"] == 1 and "No space left" in next(iter(first["excluded"].values()))
    again = prepare(src, tmp_path / "out", tmp_path / "r.json", params, jobs=1)
    assert again["summary"]["prepared"] == 1 and len(calls) == 2


def test_a_missing_data_file_is_named_and_tried_again_when_it_is_back(raw_pair, tmp_path):
    """A raw store whose t2w data file is missing (a pull that stopped) read as zeros: the exam
    was excluded for a constant image, and that exclusion was reused after the file came back.
    A prepared store that lost a data file is made again instead of reused."""
    src = tmp_path / "raw"
    exam = src / "site-B" / raw_pair["site-B"].name
    shutil.copytree(raw_pair["site-B"], exam)
    shard = exam / "t2w" / "c.0.0.0"
    kept = shard.read_bytes()
    shard.unlink()
    params = {"prepare": {"image_size": 64}, "seed": 0, "profile": "demo"}
    first = prepare(src, tmp_path / "out", tmp_path / "r.json", params, jobs=1)
    (why,) = first["excluded"].values()
    assert f"{shard}: the data file of 't2w' is missing" in why
    shard.write_bytes(kept)
    again = prepare(src, tmp_path / "out", tmp_path / "r.json", params, jobs=1)
    assert again["summary"]["prepared"] == 1
    (out,) = (tmp_path / "out").rglob("*.zarr")
    (out / "t1w" / "c.0.0.0").unlink()
    third = prepare(src, tmp_path / "out", tmp_path / "r.json", params, jobs=1)
    (entry,) = third["exams"].values()
    assert entry["status"] == "prepared" and not entry.get("reused") and open_store(out).has_data("t1w")


def test_configs_do_not_share_the_defaults():
    from ingest.prepare.service import DEFAULTS

    a = config({"seed": 0})
    config({"seed": 7, "prepare": {"registration": {"iterations": 5}}})
    assert a["registration"]["seed"] == 0 and DEFAULTS["registration"].get("seed") in (None, 0)
    assert a["registration"]["iterations"] == DEFAULTS["registration"]["iterations"] != 5


@pytest.mark.parametrize("change, why", [
    ({"image_size": "abc"}, "prepare.image_size 'abc': expected a whole number of pixels"),
    ({"image_size": 4}, "prepare.image_size 4: expected a whole number of pixels"),
    ({"image_size": True}, "prepare.image_size True"),
    ({"fov_mm": -3}, "prepare.fov_mm -3: expected a field of view in mm"),
    ({"targets": ["pd"]}, "unknown target contrast"),
])
def test_bad_prepare_params_are_one_line_errors(change, why):
    with pytest.raises(PrepareError, match=f"params: .*{why}"):
        config({"prepare": change})


@pytest.mark.parametrize("site, role", [("site-A", "t1w"), ("site-B", "swi")])
def test_a_left_right_mirrored_series_is_refused(raw_pair, tmp_path, site, role):
    """Voxels flipped left-right under an unchanged geometry (a wrong-handed export): rigid
    registration cannot undo it and the brain is near-symmetric, so only the comparison with
    the series' own mirror image tells. SWI fits its mirror most closely of the five."""
    def edit(arrays, group):
        vol, a = arrays[role]
        lr = int(np.argmax(np.abs(np.asarray(a["affine_lps"], float)[0, :3])))
        arrays[role] = (np.ascontiguousarray(np.flip(vol, lr)), a)

    e = run_exam(copy_store(raw_pair[site], tmp_path / "m.zarr", edit), tmp_path)
    assert e["status"] == "excluded" and f"{role}: the series looks left-right mirrored" in e["reason"], e
    reg = e["registration"][role]
    assert reg["mi_mirrored"] > reg["mi_after"] + CFG["registration"]["mirror_margin"]
    assert not (tmp_path / "prep" / "x.zarr").exists()


def test_series_as_stored_fit_better_than_their_mirrors(prepared_pair):
    _, rep = prepared_pair
    for key, exam in rep["exams"].items():
        for role, reg in exam["registration"].items():
            assert reg["mi_after"] - reg["mi_mirrored"] > 0.01, (key, role, reg)


def test_cli_names_a_store_url_it_has_no_credentials_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    r = subprocess.run([sys.executable, "-m", "ingest", "prepare", "s3://qsnet-nowhere/stores/raw", str(tmp_path / "out"),
                        "--report", str(tmp_path / "r.json")], capture_output=True, text=True, env=env, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1
    assert r.stderr.strip().startswith("qsnet prepare: error: s3://qsnet-nowhere/stores/raw: no storage credentials")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_refuses_a_url_to_write_to(tmp_path):
    """DST as a Path turned s3://b/prepared into a local folder "s3:/b/prepared"."""
    r = subprocess.run([sys.executable, "-m", "ingest", "prepare", str(tmp_path / "raw"), "s3://b/prepared"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        "qsnet prepare: error: DST s3://b/prepared: prepare writes to a folder, not a URL; prepare into a folder "
        "and upload it (platform/README.md)")
    assert not (tmp_path / "s3:").exists()
