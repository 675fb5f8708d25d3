"""The phantom sites: bad input, atomic writes, DICOM validity, geometry, physics, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from niftiref import compare_to_nifti

from ingest.nifti import RAS_TO_LPS
from ingest.phantom import simulate as sim
from ingest.phantom.anatomy import load_template
from ingest.phantom.qa import run_qa
from ingest.reader import read_series


def qsnet(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ingest", *args], capture_output=True, text=True, cwd=cwd)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- bad input

def _one_line_error(res, *needles):
    assert res.returncode != 0
    lines = [l for l in res.stderr.strip().splitlines() if l]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_size_and_site(tmp_path):
    _one_line_error(qsnet("simulate", "--out", str(tmp_path / "d"), "--size", "huge"), "unknown size", "huge")
    _one_line_error(qsnet("simulate", "--out", str(tmp_path / "d"), "--site", "site-C"), "unknown site", "site-C")
    assert not (tmp_path / "d").exists()


def test_output_folder_with_other_files(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _one_line_error(qsnet("simulate", "--out", str(out)), str(out), "other files")
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def _write_maps(folder: Path, maps: dict, affine_ras: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in maps.items():
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine_ras), str(folder / f"{name}.nii.gz"))


def test_anatomy_missing_map_and_mismatched_grids(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.random((10, 12, 14)) * 0.3
    _write_maps(tmp_path / "a", {"gm": vol, "wm": vol}, np.eye(4))
    res = qsnet("simulate", "--out", str(tmp_path / "d1"), "--anatomy", str(tmp_path / "a"))
    _one_line_error(res, "csf.nii.gz", "missing")
    _write_maps(tmp_path / "b", {"gm": vol, "wm": vol}, np.eye(4))
    _write_maps(tmp_path / "b", {"csf": vol[:-1]}, np.eye(4))
    _one_line_error(qsnet("simulate", "--out", str(tmp_path / "d2"), "--anatomy", str(tmp_path / "b")),
                    "csf.nii.gz", "not on the grid")
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    _write_maps(tmp_path / "c", {"gm": vol, "wm": vol}, np.eye(4))
    _write_maps(tmp_path / "c", {"csf": vol}, shifted)
    _one_line_error(qsnet("simulate", "--out", str(tmp_path / "d3"), "--anatomy", str(tmp_path / "c")),
                    "csf.nii.gz", "not on the grid")
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3"))


def test_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = []

    def boom(exam_dir, *a, **k):
        calls.append(exam_dir)
        exam_dir.mkdir(parents=True)
        (exam_dir / "partial.dcm").write_bytes(b"half")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(sim, "simulate_exam", boom)
    with pytest.raises(RuntimeError):
        sim.simulate(tmp_path / "data", size="demo", jobs=1)
    assert calls
    assert list(tmp_path.iterdir()) == []


def test_a_changed_site_protocol_makes_the_tree_out_of_date(tmp_path, monkeypatch):
    """A site file edited (a flip angle corrected) changes the data: the next simulate rewrites
    the tree instead of calling it up to date. Comments in the file do not count."""
    def fake_exam(exam_dir, site, i, *a, **k):
        exam_dir.mkdir(parents=True)
        (exam_dir / "x.dcm").write_bytes(b"x")
        return {"exam": exam_dir.name, "site": site, "timings": {}}

    monkeypatch.setattr(sim, "simulate_exam", fake_exam)
    out = tmp_path / "data"
    assert not sim.simulate(out, size="demo", sites=("site-B",), subjects=1, jobs=1)["up_to_date"]
    assert sim.simulate(out, size="demo", sites=("site-B",), subjects=1, jobs=1)["up_to_date"]
    real = sim.load_site

    def edited(site):
        cfg = real(site)
        cfg["_source"] = "elsewhere"  # where it was read from is not the protocol
        return cfg

    monkeypatch.setattr(sim, "load_site", edited)
    assert sim.simulate(out, size="demo", sites=("site-B",), subjects=1, jobs=1)["up_to_date"]

    def corrected(site):
        cfg = real(site)
        cfg["series"]["t2w"]["flip_angle"] = 150.0
        return cfg

    monkeypatch.setattr(sim, "load_site", corrected)
    assert not sim.simulate(out, size="demo", sites=("site-B",), subjects=1, jobs=1)["up_to_date"]
    assert "site-B" in json.loads((out / sim.MARKER).read_text())["protocols"]


# ---------------------------------------------------------------- the demo tree

@pytest.mark.slow
def test_tree_layout_and_size(demo_tree):
    marker = json.loads((demo_tree / "PHANTOM.json").read_text())
    assert marker["size"] == "demo" and len(marker["exams"]) == 14
    for site, n in (("site-A", 8), ("site-B", 6)):
        exams = sorted(p for p in (demo_tree / site).iterdir() if p.is_dir())
        assert len(exams) == n
        for exam in exams:
            series = [p for p in exam.iterdir() if p.is_dir() and p.name != "truth"]
            assert len(series) == 7
            assert {p.name for p in (exam / "truth").iterdir()} == {"labels.nii.gz", "brain.nii.gz", "truth.json"}
    total = sum(p.stat().st_size for p in demo_tree.rglob("*") if p.is_file())
    assert total < 150e6, f"demo data is {total / 1e6:.0f} MB"


@pytest.mark.slow
def test_headers_follow_table1_and_vendor_style(demo_tree):
    from ingest.siteconfig import load_site

    for site in ("site-A", "site-B"):
        cfg = load_site(site)
        exam = sorted((demo_tree / site).iterdir())[0]
        truth = json.loads((exam / "truth" / "truth.json").read_text())
        for role, s in truth["series"].items():
            want = cfg["series"][role]
            ds = pydicom.dcmread(next((exam / s["folder"]).iterdir()))
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
            assert ds.Manufacturer == cfg["manufacturer"] and ds.ManufacturerModelName == cfg["model"]
            assert ds.SeriesDescription == want["description"]
            assert float(ds.RepetitionTime) == pytest.approx(want["tr"])
            assert float(ds.EchoTime) == pytest.approx(want["te"])
            if "ti" in want:
                assert float(ds.InversionTime) == pytest.approx(want["ti"])
            assert float(ds.FlipAngle) == pytest.approx(want["flip_angle"])
            assert list(ds.ImageType) == want["image_type"]
            # the fake identity is there, for de-identification downstream to remove
            assert str(ds.PatientName) and ds.PatientID and ds.PatientBirthDate and ds.InstitutionName
            if role.startswith("mrf"):
                assert ds.ImageType[0] == "DERIVED"
                assert float(ds.RescaleSlope) == cfg["phantom"]["mrf"]["map_rescale_slope"]
        if site == "site-A":  # paper size keeps Table 1 spacing; demo scales it by 4
            ds = pydicom.dcmread(next((exam / truth["series"]["mrf_t1"]["folder"]).iterdir()))
            assert float(ds.SliceThickness) == 5.0 and float(ds.PixelSpacing[0]) == pytest.approx(4.0)


@pytest.mark.slow
def test_dcm2niix_geometry_matches_intended(demo_tree, tmp_path):
    """Every series converts with dcm2niix, and its affine equals the simulator's within 0.01 mm."""
    n = 0
    for truth_file in sorted(demo_tree.glob("site-*/*/truth/truth.json")):
        exam = truth_file.parent.parent
        truth = json.loads(truth_file.read_text())
        for role, s in truth["series"].items():
            out = tmp_path / f"{exam.parent.name}_{exam.name}_{role}"
            out.mkdir()
            res = subprocess.run(["dcm2niix", "-b", "n", "-z", "n", "-f", "vol", "-o", str(out),
                                  str(exam / s["folder"])], capture_output=True, text=True)
            assert res.returncode == 0 and "Error" not in res.stdout + res.stderr, res.stdout + res.stderr
            niis = list(out.glob("*.nii"))
            assert len(niis) == 1, (exam, role, res.stdout)
            vol, affine, _ = read_series(sorted((exam / s["folder"]).iterdir()))
            assert np.allclose(affine, np.array(s["affine_lps"]), atol=1e-4)
            compare_to_nifti(vol, np.array(s["affine_lps"]), niis[0], atol_mm=0.01)
            n += 1
    assert n == 14 * 7


@pytest.mark.slow
def test_physics_sanity(demo_tree):
    rep = run_qa(demo_tree)
    for site, checks in rep["checks"].items():
        failed = [k for k, ok in checks.items() if not ok]
        assert not failed, f"{site}: {failed}"
    assert "t2flair_oedema>wm" in rep["checks"]["site-B"]
    cross = rep["cross_site"]
    # MRF is quantitative: the sites agree within MRF's inter-scanner error.
    for t in ("wm", "gm"):
        assert cross[f"mrf_t1_{t}_rel_diff"] < 0.08
        assert cross[f"mrf_t2_{t}_rel_diff"] < 0.15
    # Weighted images are not: where the protocols imply a clear difference in GM/WM
    # contrast, the images show it with the same sign.
    for role in ("t1w", "t1flair", "t2flair"):
        c = cross[f"{role}_gm_wm_ratio_A_minus_B"]
        if abs(c["protocol"]) > 0.05:
            assert np.sign(c["measured"]) == np.sign(c["protocol"]), (role, c)
    # and in scale: each vendor's integer range
    a = [rep["sites"]["site-A"]["means"][r]["wm"] for r in ("t1w", "t2w", "t1flair", "t2flair")]
    b = [rep["sites"]["site-B"]["means"][r]["wm"] for r in ("t1w", "t2w", "t1flair", "t2flair")]
    assert max(a) < 4096  # Siemens 12-bit magnitude
    assert np.std(np.log(b)) > np.std(np.log(a)) * 0.5 and a != b


@pytest.mark.slow
def test_lesions_and_truth_labels(demo_tree):
    for exam in sorted((demo_tree / "site-B").iterdir()):
        truth = json.loads((exam / "truth" / "truth.json").read_text())
        assert truth["cohort"] == "gbm" and truth["lesions"]
        lab = np.asarray(nib.load(str(exam / "truth" / "labels.nii.gz")).dataobj)
        assert {8, 9, 10} & set(np.unique(lab)), exam.name
    for exam in sorted((demo_tree / "site-A").iterdir()):
        truth = json.loads((exam / "truth" / "truth.json").read_text())
        assert truth["cohort"] == "healthy" and not truth["lesions"]
        lab = np.asarray(nib.load(str(exam / "truth" / "labels.nii.gz")).dataobj)
        assert not ({8, 9, 10, 11} & set(np.unique(lab)))


@pytest.mark.slow
def test_series_are_not_voxel_aligned(demo_tree):
    """Each series has its own pose and grid: registration is needed downstream."""
    truth = json.loads(next(demo_tree.glob("site-A/*/truth/truth.json")).read_text())
    poses = [np.array(s["pose_head_to_lps"]) for r, s in truth["series"].items() if r != "mrf_t2"]
    for p in poses[1:]:
        assert not np.allclose(p, poses[0], atol=0.1)
    affs = {r: np.array(s["affine_lps"]) for r, s in truth["series"].items()}
    assert np.allclose(affs["mrf_t1"], affs["mrf_t2"])
    assert not np.allclose(affs["t1w"], affs["mrf_t1"], atol=0.5)


@pytest.mark.slow
def test_deterministic_bytes(demo_tree, tmp_path):
    """An exam simulated again in this process equals the one the pool wrote, byte for byte."""
    for site, idx in (("site-A", 1), ("site-B", 0)):
        name = sim._exam_name(site, idx)
        sim.simulate_exam(tmp_path / name, site, idx, 0, "demo", None)
        assert tree_digest(tmp_path / name) == tree_digest(demo_tree / site / name)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


_AVX512 = "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR AVX512_KNL AVX512_KNM"


@pytest.mark.slow
def test_same_bytes_whatever_the_cpu_kernels(demo_tree, tmp_path):
    """The data (and so data.dvc and every stage after it) must not depend on the machine:
    numpy and OpenBLAS pick SIMD kernels by CPU, and their last bits once showed in the
    16-character header strings (an Intel and an AMD machine simulated different data.dvc).
    One exam is simulated again with other kernels forced, as on a CPU without AVX-512 and
    with OpenBLAS's Haswell or SkylakeX kernels, and must equal the pool's bytes."""
    import platform

    flags = _cpu_flags()
    if platform.machine() != "x86_64" or not {"avx2", "fma"} <= flags:
        pytest.skip("needs an x86-64 CPU with AVX2 and FMA to force other kernels")
    variants = [{"NPY_DISABLE_CPU_FEATURES": _AVX512, "OPENBLAS_CORETYPE": "Haswell"}]
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        variants.append({"OPENBLAS_CORETYPE": "SkylakeX"})
    site, idx = "site-B", 0
    name = sim._exam_name(site, idx)
    want = tree_digest(demo_tree / site / name)
    code = ("import sys; from pathlib import Path; from ingest.phantom import simulate as sim; "
            "sim.simulate_exam(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), 0, 'demo', None)")
    for k, env in enumerate(variants):
        out = tmp_path / f"v{k}" / name
        res = subprocess.run([sys.executable, "-c", code, str(out), site, str(idx)], capture_output=True,
                             text=True, env={**os.environ, **env})
        assert res.returncode == 0, res.stderr[-2000:]
        got = tree_digest(out)
        assert got == want, (env, sorted(f for f in want if got.get(f) != want[f])[:5])


@pytest.mark.slow
def test_rerun_is_a_no_op_and_view_works(demo_tree, tmp_path):
    res = qsnet("simulate", "--out", str(demo_tree))
    assert res.returncode == 0 and "nothing to do" in res.stdout
    for site in ("site-A", "site-B"):
        png = tmp_path / f"{site}.png"
        res = qsnet("view", str(next((demo_tree / site).iterdir())), "--out", str(png))
        assert res.returncode == 0, res.stderr
        assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_no_phi_in_logs(demo_tree):
    """The simulator itself prints no identity from the headers it invents."""
    res = qsnet("simulate", "--out", str(demo_tree))
    ds = pydicom.dcmread(next(demo_tree.glob("site-A/*/S*/IM0001.dcm")))
    for field in (str(ds.PatientName).split("^")[0], ds.PatientID, ds.PatientBirthDate):
        assert field not in res.stdout + res.stderr


@pytest.mark.slow
def test_dvc_status_clean_for_committed_data_dvc(demo_tree, repo, tmp_path):
    """A newcomer's fresh `qsnet simulate` matches the data.dvc committed in the repository."""
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copy(repo / "data.dvc", work / "data.dvc")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=work, check=True)
    shutil.copytree(demo_tree, work / "data")
    res = subprocess.run(["dvc", "status", "data.dvc", "--json"], cwd=work, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # A fresh clone has an empty cache: DVC says "not in cache" when the workspace matches
    # data.dvc and "modified" when it does not.
    assert json.loads(res.stdout) in ({}, {"data.dvc": [{"changed outs": {"data": "not in cache"}}]}), res.stdout
    committed = (work / "data.dvc").read_bytes()
    subprocess.run(["dvc", "add", "-q", "data"], cwd=work, check=True)
    assert (work / "data.dvc").read_bytes() == committed, "fresh simulation does not hash like data.dvc"
    res = subprocess.run(["dvc", "status", "data.dvc", "--json"], cwd=work, capture_output=True, text=True)
    assert json.loads(res.stdout or "{}") == {}, res.stdout


# ---------------------------------------------------------------- pluggable anatomy

@pytest.mark.slow
def test_anatomy_on_another_grid(tmp_path):
    """The MNI maps resampled to 2.5 mm with flipped, permuted axes give a sane phantom."""
    from scipy import ndimage

    maps, aff_lps = load_template(None)
    # new grid: axes permuted (y, x, z), x flipped, 2.5 mm voxels, shifted origin
    src_ras = RAS_TO_LPS @ aff_lps
    bbox = np.array([[-100, 100], [-130, 100], [-80, 100]], float)
    shape = tuple(int(np.ceil((b[1] - b[0]) / 2.5)) for b in bbox[[1, 0, 2]])
    new_ras = np.zeros((4, 4))
    new_ras[3, 3] = 1
    new_ras[1, 0] = 2.5          # i -> +A
    new_ras[0, 1] = -2.5         # j -> -R (flipped)
    new_ras[2, 2] = 2.5
    new_ras[:3, 3] = [bbox[0, 1], bbox[1, 0], bbox[2, 0]]
    m = np.linalg.inv(src_ras) @ new_ras
    idx = np.indices(shape, dtype=float)
    coords = [m[r, 0] * idx[0] + m[r, 1] * idx[1] + m[r, 2] * idx[2] + m[r, 3] for r in range(3)]
    folder = tmp_path / "anat"
    _write_maps(folder, {k: ndimage.map_coordinates(v, coords, order=1) for k, v in maps.items()}, new_ras)
    out = tmp_path / "data"
    res = qsnet("simulate", "--out", str(out), "--anatomy", str(folder), "--subjects", "2", "--jobs", "2")
    assert res.returncode == 0, res.stderr
    marker = json.loads((out / "PHANTOM.json").read_text())
    assert marker["anatomy"].startswith("sha256:")
    rep = run_qa(out)
    for site, checks in rep["checks"].items():
        failed = [k for k, ok in checks.items() if not ok]
        assert not failed, f"{site}: {failed}"


def test_fake_exams_of_different_trees_share_no_uid_and_ages_match_the_dates():
    """Trees simulated with another seed, size or anatomy are different images: sent to one PACS
    they must not overwrite each other, so their UIDs differ (and stay put for the same tree)."""
    from datetime import date

    import numpy as np

    from ingest.phantom.simulate import fake_exam
    from ingest.siteconfig import load_site

    cfg = load_site("site-A")

    def exam(run):
        return fake_exam(cfg, 3, np.random.default_rng(7), run=run)

    a, same, other = exam("seed 0|demo|x|v1"), exam("seed 0|demo|x|v1"), exam("seed 1|demo|x|v1")
    for k in ("study_uid", "frame_of_reference_uid", "uid_seed"):
        assert a[k] == same[k] and a[k] != other[k], k
    for i in range(40):
        e = fake_exam(cfg, i, np.random.default_rng(i))
        born, seen = (date(int(d[:4]), int(d[4:6]), int(d[6:8])) for d in (e["birth_date"], e["study_date"]))
        assert int(e["age"][:3]) == seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))


def test_phantom_qa_refuses_an_out_it_cannot_write_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "data", tmp_path / "afile" / "qa.json"):
        res = subprocess.run([sys.executable, "-m", "ingest", "phantom-qa", str(tmp_path / "data"), "--out", str(out)],
                             capture_output=True, text=True)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith(f"qsnet phantom-qa: error: {out}")
    assert not list(tmp_path.rglob("*.tmp"))
