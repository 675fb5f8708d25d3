"""`qsnet ingest` on the phantom and on a tree mixing good and bad files: every file accounted for."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ingest.manifest import file_sha256
from ingest.store import open_store


def qsnet(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ingest", *args], capture_output=True, text=True, **kw)


def input_files(root: Path) -> list[str]:
    """Every file a person would count: regular files, not following directory links."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_file() or p.stat(follow_symlinks=False).st_size == 0:
                out.append(str(p.relative_to(root)))
    return sorted(out)


def manifest_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def series_dir(exam: Path, role: str) -> Path:
    truth = json.loads((exam / "truth" / "truth.json").read_text())
    return exam / truth["series"][role]["folder"]


@pytest.fixture(scope="module")
def mixed_tree(demo_tree, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mixed") / "data"
    for exam in ["sub-A01", "sub-A02", "sub-A03", "sub-A04", "sub-A05", "sub-A06", "sub-A07", "sub-A08"]:
        shutil.copytree(demo_tree / "site-A" / exam, root / "site-A" / exam)
    shutil.copytree(demo_tree / "site-B" / "sub-B01", root / "site-B" / "sub-B01")
    expect = {}
    a = root / "site-A"
    # 1. a non-DICOM file and a zero-byte file
    (a / "sub-A01" / "notes.txt").write_text("scanner notes, not an image\n")
    (a / "sub-A01" / "empty.dcm").write_bytes(b"")
    expect["notes"] = "site-A/sub-A01/notes.txt"
    expect["empty"] = "site-A/sub-A01/empty.dcm"
    # 2. truncated mid-pixel-data
    f = sorted(series_dir(a / "sub-A02", "t2w").iterdir())[3]
    f.write_bytes(f.read_bytes()[:-2000])
    expect["truncated"] = str(f.relative_to(root))
    # 3. Rows x Columns far larger than the bytes present
    f = sorted(series_dir(a / "sub-A03", "t1flair").iterdir())[2]
    ds = pydicom.dcmread(f)
    ds.Rows, ds.Columns = 4096, 4096
    ds.save_as(f)
    expect["huge"] = str(f.relative_to(root))
    # 4. no pixel data
    f = sorted(series_dir(a / "sub-A04", "swi").iterdir())[1]
    ds = pydicom.dcmread(f)
    del ds.PixelData
    ds.save_as(f)
    expect["nopixels"] = str(f.relative_to(root))
    # 5. a series with a missing slice
    files = sorted(series_dir(a / "sub-A05", "t2flair").iterdir())
    files[len(files) // 2].unlink()
    expect["missing_series"] = str(files[0].relative_to(root))
    # 6. duplicate SOP instance
    f = sorted(series_dir(a / "sub-A06", "t1w").iterdir())[4]
    dup = f.parent / "IM_copy.dcm"
    shutil.copy(f, dup)
    expect["duplicate"] = str(dup.relative_to(root))
    # 7. two series sharing one SeriesInstanceUID with different orientations (t2w relabelled as t1w's series)
    t1 = pydicom.dcmread(next(series_dir(a / "sub-A07", "t1w").iterdir()), stop_before_pixels=True)
    for f in series_dir(a / "sub-A07", "t2w").iterdir():
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = t1.SeriesInstanceUID, t1.SeriesNumber
        ds.save_as(f)
    # 8. unsupported transfer syntax (MPEG-2)
    f = sorted(series_dir(a / "sub-A08", "mrf_t1").iterdir())[0]
    ds = pydicom.dcmread(f)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.save_as(f, enforce_file_format=False)
    expect["unsupported"] = str(f.relative_to(root))
    # 9. a symlink loop
    os.symlink("..", a / "sub-A08" / "loop")
    return root, expect


@pytest.fixture(scope="module")
def ingested(mixed_tree, tmp_path_factory):
    root, expect = mixed_tree
    out = tmp_path_factory.mktemp("stores")
    res = qsnet("ingest", str(root), str(out / "raw"), "--manifest", str(out / "manifest.csv"), "--jobs", "2")
    return root, out, expect, res


@pytest.mark.slow
def test_manifest_accounts_for_every_file(ingested):
    root, out, expect, res = ingested
    assert res.returncode == 0, res.stderr
    rows = manifest_rows(out / "manifest.csv")
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))
    files = input_files(root)
    assert sorted(p for p in paths if p in files) == files
    by = {r["path"]: r for r in rows}
    # each row's hash and size are the file's (most come from the scan's single read)
    for rel in files:
        if by[rel]["sha256"]:
            assert by[rel]["sha256"] == file_sha256(root / rel), rel
            assert int(by[rel]["size"]) == (root / rel).stat().st_size, rel
    assert by[expect["notes"]]["status"] == "ignored"
    for k in ("empty", "truncated", "huge", "nopixels", "missing_series", "duplicate", "unsupported"):
        assert by[expect[k]]["status"] == "quarantined", (k, by[expect[k]])
        assert by[expect[k]]["reason"], k
    assert "transfer syntax" in by[expect["unsupported"]]["reason"].lower()
    assert "duplicate" in by[expect["duplicate"]]["reason"].lower()
    assert "missing" in by[expect["missing_series"]]["reason"].lower()
    # the loop is reported, not followed forever
    assert any("loop" in r["path"] for r in rows if r["status"] != "ingested")


@pytest.mark.slow
def test_bad_files_do_not_stop_the_rest(ingested):
    root, out, expect, res = ingested
    stores = sorted((out / "raw").rglob("*.zarr"))
    assert len(stores) == 9, stores
    for s in stores:
        st = open_store(s)
        st.verify()
        assert {"mrf_t2"} <= set(st.roles)
    # the relabelled exam: split by orientation, both parts recognised and kept
    rows = manifest_rows(out / "manifest.csv")
    a07 = [r for r in rows if r["path"].startswith("site-A/sub-A07/") and r["status"] == "ingested"]
    subject = a07[0]["subject"]
    st = open_store(out / "raw" / "site-A" / f"{subject}.zarr")
    assert {"t1w", "t2w"} <= set(st.roles)
    assert st.array("t1w").shape != st.array("t2w").shape


@pytest.mark.slow
def test_no_phi_in_outputs_or_logs(ingested):
    root, out, expect, res = ingested
    identities = set()
    for f in root.rglob("IM0001.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        identities |= {str(ds.PatientName), str(ds.PatientName).split("^")[0], ds.PatientID,
                       ds.PatientBirthDate, ds.InstitutionName, ds.AccessionNumber, ds.StudyInstanceUID}
    texts = [res.stdout, res.stderr, (out / "manifest.csv").read_text()]
    texts += [p.read_text() for p in (out / "raw").rglob("zarr.json")]
    for text in texts:
        for ident in identities:
            assert ident not in text, ident


@pytest.mark.slow
def test_rerun_is_idempotent_and_strict_fails(ingested):
    root, out, expect, res = ingested
    before = {p: (p.stat().st_ino, open_store(p).content_hash()) for p in (out / "raw").rglob("*.zarr")}
    res2 = qsnet("ingest", str(root), str(out / "raw"), "--manifest", str(out / "manifest.csv"), "--jobs", "2")
    assert res2.returncode == 0 and "9 unchanged" in res2.stdout, res2.stdout
    after = {p: (p.stat().st_ino, open_store(p).content_hash()) for p in (out / "raw").rglob("*.zarr")}
    assert before == after
    res3 = qsnet("ingest", str(root), str(out / "raw"), "--manifest", str(out / "manifest.csv"), "--strict")
    assert res3.returncode != 0
    assert len([l for l in res3.stderr.splitlines() if "error" in l]) == 1


@pytest.mark.slow
def test_stores_made_by_another_ingest_version_are_made_again(ingested):
    """A reader fix must reach stores written before it: the unchanged-exam check trusts only
    stores this code made. A store that comes out the same keeps its files (and DVC its hash)."""
    import json

    from ingest.service import code_marker

    root, out, expect, res = ingested
    marker = code_marker(out / "manifest.csv")
    assert not [p for p in (out / "raw").iterdir() if p.is_file()]   # DST holds stores only: its hash is theirs
    code = marker.read_text()
    stores = sorted((out / "raw").rglob("*.zarr"))
    # the store an older version made: one attribute this version does not write
    meta = stores[0] / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["made_by"] = "an older version"
    meta.write_text(json.dumps(doc, indent=2))
    before = {p: (p / "zarr.json").stat().st_mtime_ns for p in stores[1:]}
    res2 = qsnet("ingest", str(root), str(out / "raw"), "--manifest", str(out / "manifest.csv"))
    assert res2.returncode == 0 and "9 unchanged" in res2.stdout, res2.stdout   # same code: trusted as it is
    assert "made_by" in open_store(stores[0]).attrs
    marker.write_text("0" * 64 + "\n")
    res3 = qsnet("ingest", str(root), str(out / "raw"), "--manifest", str(out / "manifest.csv"))
    assert res3.returncode == 0 and "1 written, 8 unchanged" in res3.stdout, res3.stdout
    assert "made_by" not in open_store(stores[0]).attrs
    assert {p: (p / "zarr.json").stat().st_mtime_ns for p in stores[1:]} == before   # not rewritten
    assert marker.read_text() == code
    # a run of other code that is cut short leaves no marker: nothing it half redid is trusted
    import ingest.service as service

    def broken_manifest(*a, **k):
        raise OSError(28, "No space left on device")
    marker.write_text("0" * 64 + "\n")
    from unittest import mock

    with mock.patch("ingest.manifest.write_manifest", broken_manifest):
        with pytest.raises(service.IngestError):
            service.ingest(root, out / "raw", out / "manifest.csv", jobs=1)
    assert not marker.exists()
    assert qsnet("ingest", str(root), str(out / "raw"), "--manifest", str(out / "manifest.csv")).returncode == 0
    assert marker.read_text() == code


@pytest.mark.slow
def test_phantom_stores_match_contract(demo_tree, tmp_path):
    res = qsnet("ingest", str(demo_tree), str(tmp_path / "raw"), "--manifest", str(tmp_path / "m.csv"))
    assert res.returncode == 0, res.stderr
    rows = manifest_rows(tmp_path / "m.csv")
    assert len(rows) == len(input_files(demo_tree))
    assert not [r for r in rows if r["status"] == "quarantined"]
    stores = sorted((tmp_path / "raw").rglob("*.zarr"))
    assert len(stores) == 14
    for s in stores:
        st = open_store(s)
        assert set(st.roles) == {"mrf_t1", "mrf_t2", "t1w", "t2w", "t1flair", "t2flair", "swi", "labels", "brain"}
        a = st.attrs
        assert a["schema_version"] == 1 and a["site"] in ("site-A", "site-B") and a["split"]
        assert a["cohort"] == ("healthy" if a["site"] == "site-A" else "gbm")
        t1 = st.attrs_of("mrf_t1")
        assert t1["units"] == "ms" and len(t1["affine_lps"]) == 4 and t1["sha256"]
        assert st.array("t1w").chunks[0] == 1
        wm = st.read("mrf_t1")[st.read("labels") == 3]
        assert 700 < np.median(wm) < 1100
    png = tmp_path / "store.png"
    res = qsnet("view", str(stores[0]), "--out", str(png))
    assert res.returncode == 0 and png.stat().st_size > 10_000, res.stderr


@pytest.mark.slow
def test_killed_mid_write_leaves_no_half_store(demo_tree, tmp_path):
    dst = tmp_path / "raw"
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "ingest", str(demo_tree), str(dst), "--jobs", "1",
                             "--manifest", str(tmp_path / "m.csv")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(dst.rglob(".*.tmp-*")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for s in dst.rglob("*.zarr"):
        if not s.name.startswith("."):
            open_store(s).verify()  # whatever is visible is whole
    res = qsnet("ingest", str(demo_tree), str(dst), "--manifest", str(tmp_path / "m.csv"))
    assert res.returncode == 0, res.stderr
    assert len([s for s in dst.rglob("*.zarr") if not s.name.startswith(".")]) == 14
    assert not list(dst.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_adding_an_exam_writes_only_its_store(demo_tree, tmp_path):
    src, dst = tmp_path / "data", tmp_path / "raw"
    for site, exam in (("site-A", "sub-A01"), ("site-B", "sub-B01")):
        shutil.copytree(demo_tree / site / exam, src / site / exam)
    res = qsnet("ingest", str(src), str(dst), "--manifest", str(tmp_path / "m.csv"))
    assert res.returncode == 0 and "2 written" in res.stdout, res.stdout + res.stderr
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.rglob("*.zarr")}
    shutil.copytree(demo_tree / "site-B" / "sub-B02", src / "site-B" / "sub-B02")
    res = qsnet("ingest", str(src), str(dst), "--manifest", str(tmp_path / "m.csv"))
    assert res.returncode == 0 and "1 written, 2 unchanged" in res.stdout, res.stdout + res.stderr
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.rglob("*.zarr")}
    assert len(after) == 3
    assert all(after[p] == v for p, v in before.items())
    assert len(manifest_rows(tmp_path / "m.csv")) == len(input_files(src))
    # removing an exam: --prune deletes its store, and only with --prune
    shutil.rmtree(src / "site-B" / "sub-B02")
    res = qsnet("ingest", str(src), str(dst), "--manifest", str(tmp_path / "m.csv"))
    assert res.returncode == 0 and len(list(dst.rglob("*.zarr"))) == 3
    assert "1 store(s) under" in res.stdout and "--prune removes them" in res.stdout, res.stdout
    res = qsnet("ingest", str(src), str(dst), "--manifest", str(tmp_path / "m.csv"), "--prune")
    assert res.returncode == 0 and "1 store(s) of removed exams deleted" in res.stdout, res.stdout
    assert set(dst.rglob("*.zarr")) == set(before)


@pytest.mark.slow
def test_real_world_names_text_and_repeats(demo_tree, tmp_path):
    """Files as real sites send them: a name with a backslash (a Windows zip unpacked here), a
    name that is not UTF-8, a description with a Latin-1 byte and no declared character set, and
    a broken series followed by its complete repeat. Every file gets its row, the exam keeps the
    repeat, and the other exam is not disturbed."""
    from ingest.manifest import read_manifest

    root = tmp_path / "data"
    for exam in ("sub-A01", "sub-A02"):
        shutil.copytree(demo_tree / "site-A" / exam, root / "site-A" / exam)
    a1, a2 = root / "site-A" / "sub-A01", root / "site-A" / "sub-A02"
    # a broken copy of the T1w series numbered before it, so that it is met first
    t1w = series_dir(a1, "t1w")
    broken = a1 / "S001_broken_first_try"
    broken.mkdir()
    uid = pydicom.uid.generate_uid()
    files = sorted(t1w.iterdir())
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = uid, 1
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(broken / f.name)
    (broken / files[len(files) // 2].name).unlink()
    # odd but legal file names
    t2w = sorted(series_dir(a1, "t2w").iterdir())
    t2w[0].rename(t2w[0].parent / "IM\\0001.dcm")
    os.rename(t2w[1], os.fsencode(t2w[1].parent) + b"/IM_\xff.dcm")
    # a Latin-1 byte in the description, no SpecificCharacterSet
    for f in series_dir(a2, "t2w").iterdir():
        ds = pydicom.dcmread(f)
        del ds.SpecificCharacterSet
        ds.save_as(f)
        f.write_bytes(f.read_bytes().replace(ds.SeriesDescription.encode(), ds.SeriesDescription[:-1].encode() + b"\xe9", 1))
    out = tmp_path / "out"
    res = qsnet("ingest", str(root), str(out / "raw"), "--manifest", str(out / "manifest.csv"), "--jobs", "2")
    assert res.returncode == 0, res.stderr
    rows = {r.path: r for r in read_manifest(out / "manifest.csv")}
    assert sorted(rows) == input_files(root)
    by_role = {}
    for r in rows.values():
        by_role.setdefault((r.path.split("/")[1], r.role, r.status), []).append(r)
    assert all(r.status == "quarantined" and "missing" in r.reason
               for p, r in rows.items() if "/S001_broken_first_try/" in p)
    assert len(by_role[("sub-A01", "t1w", "ingested")]) == len(files)
    assert len(by_role[("sub-A01", "t2w", "ingested")]) == len(t2w)
    assert ("sub-A02", "t2w", "ingested") in by_role
    stores = sorted((out / "raw" / "site-A").glob("*.zarr"))
    assert len(stores) == 2
    assert all({"t1w", "t2w", "mrf_t1"} <= set(open_store(s).roles) for s in stores)


def test_mrf_maps_follow_their_real_world_value_mapping():
    """A T1 map whose Real World Value Mapping says ms = stored x 0.5 while its Rescale Slope
    (type US) says x 1: the map is stored in ms by the mapping, not doubled."""
    from ingest.service import _maps_in_ms

    stored = np.array([[[2000.0, 3000.0]]], np.float32)
    meta = {"units": None, "rescale_slope": 1.0, "rescale_intercept": 0.0,
            "real_world_value_mapping": {"units": "ms", "slope": 0.5, "intercept": 0.0}}
    vol, m = _maps_in_ms(stored * 1.0, meta)
    assert np.array_equal(vol, stored * 0.5) and m["units"] == "ms"
    # header and mapping agree, or no mapping in ms: the values stay as they are
    same = {**meta, "units": "ms", "rescale_slope": 0.5}
    assert _maps_in_ms(stored * 0.5, same)[0] is not None and np.array_equal(_maps_in_ms(stored * 0.5, same)[0], stored * 0.5)
    assert np.array_equal(_maps_in_ms(stored, {**meta, "real_world_value_mapping": None})[0], stored)


# ---------------------------------------------------------------- review fixes: small exams, in process

def small_exam(demo_tree: Path, dst: Path, site: str = "site-A", exam: str = "sub-A01",
               roles: tuple[str, ...] = ("mrf_t1", "mrf_t2")) -> Path:
    """A phantom exam with only the series of `roles` and no ground truth (a real exam's shape, fast)."""
    for role in roles:
        d = series_dir(demo_tree / site / exam, role)
        shutil.copytree(d, dst / d.name)
    return dst


def edit(folder: Path, fn) -> None:
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f)
        fn(ds)
        ds.save_as(f)


def header(folder: Path):
    return pydicom.dcmread(next(p for p in sorted(folder.rglob("*")) if p.is_file()), stop_before_pixels=True)


def run_ingest(src: Path, out: Path, **kw) -> dict:
    from ingest.service import ingest

    return ingest(src, out / "raw", manifest=out / "manifest.csv", **{"jobs": 1, **kw})


def rows_by_folder(out: Path) -> dict[str, list[dict]]:
    by = {}
    for r in manifest_rows(out / "manifest.csv"):
        by.setdefault(r["path"].split("/")[1], []).append(r)
    return by


def expected_t1(exam: Path) -> np.ndarray:
    from ingest.reader import read_series
    from ingest.service import _maps_in_ms

    vol, _, meta = read_series(sorted(p for p in series_dir_of(exam, "MRF_FISP_T1map").iterdir()))
    return _maps_in_ms(vol, meta)[0].astype(np.float32)


def series_dir_of(exam: Path, description: str) -> Path:
    return next(d for d in exam.iterdir() if header(d).SeriesDescription == description)


def test_two_patients_sharing_a_study_uid_get_their_own_stores(demo_tree, tmp_path):
    src = tmp_path / "data"
    p1 = small_exam(demo_tree, src / "site-A" / "p1", exam="sub-A01")
    p2 = small_exam(demo_tree, src / "site-A" / "p2", exam="sub-A02")
    assert header(p1).PatientID != header(p2).PatientID
    study = header(p1).StudyInstanceUID  # a site whose PACS reuses study UIDs
    edit(p2, lambda ds: setattr(ds, "StudyInstanceUID", study))
    summary = run_ingest(src, tmp_path)
    assert summary["exams"] == 2 and summary["written"] == 2, summary
    by = rows_by_folder(tmp_path)
    subjects = {}
    for folder, exam in (("p1", p1), ("p2", p2)):
        assert {r["status"] for r in by[folder]} == {"ingested"}, by[folder]
        (subjects[folder],) = {r["subject"] for r in by[folder]}
        st = open_store(tmp_path / "raw" / "site-A" / f"{subjects[folder]}.zarr")
        assert np.array_equal(st.read("mrf_t1"), expected_t1(exam)), folder
    assert subjects["p1"] != subjects["p2"]


def test_visits_without_study_uid_do_not_share_a_store(demo_tree, tmp_path, monkeypatch):
    src = tmp_path / "data"
    v1 = small_exam(demo_tree, src / "site-A" / "visit1", exam="sub-A01")
    v2 = small_exam(demo_tree, src / "site-A" / "visit2", exam="sub-A02")
    who = header(v1)

    def same_patient_no_study(ds):
        ds.PatientID, ds.PatientName = who.PatientID, who.PatientName
        del ds.StudyInstanceUID  # an export that drops it: the exam is its folder

    edit(v1, same_patient_no_study)
    edit(v2, same_patient_no_study)
    summary = run_ingest(src, tmp_path / "a")
    assert summary["written"] == 2 and len(list((tmp_path / "a" / "raw").rglob("*.zarr"))) == 2, summary
    by = rows_by_folder(tmp_path / "a")
    for folder, exam in (("visit1", v1), ("visit2", v2)):
        (subject,) = {r["subject"] for r in by[folder]}
        st = open_store(tmp_path / "a" / "raw" / "site-A" / f"{subject}.zarr")
        assert np.array_equal(st.read("mrf_t1"), expected_t1(exam)), folder
    # the guard: two exams that would still land on one store path are both quarantined
    import ingest.service as service

    monkeypatch.setattr(service, "_names", lambda *a: ("sub-000000000000", "pat-000000000000"))
    summary = run_ingest(src, tmp_path / "b")
    rows = manifest_rows(tmp_path / "b" / "manifest.csv")
    assert summary["written"] == 0 and not list((tmp_path / "b" / "raw").rglob("*.zarr"))
    assert rows and all(r["status"] == "quarantined" and "would write the same store" in r["reason"] for r in rows)


def test_prune_renames_before_deleting_and_a_damaged_store_is_rewritten(demo_tree, tmp_path, monkeypatch):
    import ingest.service as service

    src = tmp_path / "data"
    small_exam(demo_tree, src / "site-A" / "sub-A01", exam="sub-A01")
    small_exam(demo_tree, src / "site-A" / "sub-A02", exam="sub-A02")
    run_ingest(src, tmp_path)
    subject = {f: rs[0]["subject"] for f, rs in rows_by_folder(tmp_path).items()}
    store = tmp_path / "raw" / "site-A" / f"{subject['sub-A01']}.zarr"
    # what a delete killed midway leaves: the store's metadata, one array gone
    shutil.rmtree(store / "mrf_t2")
    summary = run_ingest(src, tmp_path)
    assert summary["written"] == 1 and summary["unchanged"] == 1, summary
    assert "mrf_t2" in open_store(store).roles
    # a pruned store leaves its path in one rename, before any file of it is deleted
    gone = tmp_path / "raw" / "site-A" / f"{subject['sub-A02']}.zarr"
    seen = []
    real = shutil.rmtree

    def rmtree(path, *a, **kw):
        seen.append((Path(path), gone.exists()))
        return real(path, *a, **kw)

    monkeypatch.setattr(service.shutil, "rmtree", rmtree)
    shutil.rmtree(src / "site-A" / "sub-A02")
    summary = run_ingest(src, tmp_path, prune=True)
    assert summary["pruned"] == 1 and not gone.exists()
    (path, still_there), = [s for s in seen if s[0].name.startswith(f".{gone.name}.old-")]
    assert not still_there and not path.exists()


def test_exam_without_a_recognised_series_is_quarantined_and_its_store_kept(demo_tree, tmp_path):
    import yaml

    src = tmp_path / "data"
    small_exam(demo_tree, src / "site-A" / "sub-A01")
    small_exam(demo_tree, src / "site-B" / "sub-B01", site="site-B", exam="sub-B01")
    assert run_ingest(src, tmp_path, prune=True)["written"] == 2
    stores = sorted((tmp_path / "raw").rglob("*.zarr"))
    # the site renames its protocols: no series of site A matches its rules any more
    cfg = yaml.safe_load((Path(__file__).parents[1] / "ingest" / "sites" / "site-A.yaml").read_text())
    for s in cfg["series"].values():
        s["match"] = {"description": "^renamed protocol$"}
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "site-A.yaml").write_text(yaml.safe_dump(cfg))
    summary = run_ingest(src, tmp_path, sites_dir=tmp_path / "sites", strict=True, prune=True)
    assert summary.get("strict_failed") and summary["no_store"] == 1 and summary["kept"] == 1, summary
    assert summary["pruned"] == 0 and sorted((tmp_path / "raw").rglob("*.zarr")) == stores
    rows = rows_by_folder(tmp_path)["sub-A01"]
    assert all(r["status"] == "quarantined" for r in rows)
    assert all("exam site-A/sub-A01: no series matched a role of the site config" in r["reason"]
               and "site-A.yaml" in r["reason"] for r in rows), rows[0]
    # the site file put right, the same files: the exam is read again, not passed as unchanged
    # with the rows of the run that wrote no store beside the store of the run before it
    # (read again: its rows are ingested ones; its store comes out as it was, so it stays untouched)
    summary = run_ingest(src, tmp_path, strict=True, prune=True)
    assert summary["unchanged"] == 2 and not summary.get("strict_failed"), summary
    assert all(r["status"] == "ingested" for r in rows_by_folder(tmp_path)["sub-A01"])


@pytest.mark.parametrize("damage", ["no StudyInstanceUID", "empty PatientID"])
def test_a_slice_missing_its_study_or_patient_stays_with_its_series(demo_tree, tmp_path, damage):
    """Keyed on its own, the slice made a one-slice exam (a store under a new pseudonym) and
    the real exam lost the slice, and with it the role, as "missing"."""
    src = tmp_path / "data"
    exam = small_exam(demo_tree, src / "site-A" / "sub-A01")
    files = sorted(series_dir_of(exam, "MRF_FISP_T2map").iterdir())
    ds = pydicom.dcmread(files[len(files) // 2])
    if damage == "no StudyInstanceUID":
        del ds.StudyInstanceUID
    else:
        ds.PatientID = ""
    ds.save_as(files[len(files) // 2])
    summary = run_ingest(src, tmp_path, strict=True)
    assert summary["exams"] == 1 and summary["written"] == 1 and not summary.get("strict_failed"), summary
    (store,) = (tmp_path / "raw").rglob("*.zarr")
    assert open_store(store).array("mrf_t2").shape[0] == len(files)


def test_a_reason_quotes_a_path_named_by_a_uid_as_it_is(demo_tree, tmp_path):
    """UIDs are taken out of reasons, but a quoted path is the manifest's own row: an exam
    folder named by its StudyInstanceUID came out as <UID>, a path to no file."""
    import yaml

    src = tmp_path / "data"
    small_exam(demo_tree, src / "site-A" / "1.2.840.113619.2.55.3")
    cfg = yaml.safe_load((Path(__file__).parents[1] / "ingest" / "sites" / "site-A.yaml").read_text())
    for entry in cfg["series"].values():
        entry["match"] = {"description": "^renamed protocol$"}
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "site-A.yaml").write_text(yaml.safe_dump(cfg))
    run_ingest(src, tmp_path, sites_dir=tmp_path / "sites")
    reasons = {r["reason"] for r in manifest_rows(tmp_path / "manifest.csv")}
    assert reasons and all("exam site-A/1.2.840.113619.2.55.3: no series matched" in r for r in reasons), reasons


def test_a_series_that_matches_two_roles_is_quarantined(demo_tree, tmp_path):
    """Ignored, it cost its role unseen and --strict passed; the reason says where to fix it."""
    import yaml

    src = tmp_path / "data"
    small_exam(demo_tree, src / "site-A" / "sub-A01")
    cfg = yaml.safe_load((Path(__file__).parents[1] / "ingest" / "sites" / "site-A.yaml").read_text())
    cfg["series"]["mrf_t2"]["match"] = dict(cfg["series"]["mrf_t1"]["match"])
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "site-A.yaml").write_text(yaml.safe_dump(cfg))
    summary = run_ingest(src, tmp_path, sites_dir=tmp_path / "sites", strict=True)
    assert summary.get("strict_failed")
    t1_rows = [r for r in rows_by_folder(tmp_path)["sub-A01"] if "matches several roles" in r["reason"]]
    assert t1_rows and all(r["status"] == "quarantined" and "(mrf_t1, mrf_t2)" in r["reason"]
                           and "site-A.yaml" in r["reason"] for r in t1_rows)


@pytest.mark.parametrize("units, factor", [("s", 1e-3), ("sec", 1e-3), ("HU", 1.0)])
def test_mrf_maps_in_seconds_are_converted_and_other_units_quarantined(demo_tree, tmp_path, units, factor):
    """The store contract is ms: a T1 map in seconds was stored as it was, 1000 times too short."""
    from ingest.store import open_store

    src = tmp_path / "data"
    exam = small_exam(demo_tree, src / "site-A" / "sub-A01")
    want = expected_t1(exam)

    def in_units(ds):
        del ds.RealWorldValueMappingSequence
        ds.RescaleType, ds.RescaleSlope, ds.RescaleIntercept = units, float(ds.RescaleSlope) * factor, 0
    edit(series_dir_of(exam, "MRF_FISP_T1map"), in_units)
    summary = run_ingest(src, tmp_path)
    rows = [r for r in rows_by_folder(tmp_path)["sub-A01"] if r["role"] == "mrf_t1"]
    if units == "HU":
        assert summary["quarantined"] == len(rows) > 0
        assert all("the map's values are in 'HU'" in r["reason"] for r in rows)
        return
    (store,) = (tmp_path / "raw").rglob("*.zarr")
    st = open_store(store)
    assert st.attrs_of("mrf_t1")["units"] == "ms"
    np.testing.assert_allclose(st.read("mrf_t1"), want, rtol=1e-4, atol=1e-2)


def test_prune_deletes_nothing_while_files_in_src_cannot_be_placed(demo_tree, tmp_path):
    """An exam of a site folder without its site file (or whose headers cannot be read this
    time) still has its store under DST: which store is its cannot be told, so nothing goes."""
    import yaml

    src = tmp_path / "data"
    small_exam(demo_tree, src / "site-A" / "sub-A01")
    small_exam(demo_tree, src / "site-C" / "sub-C01", exam="sub-A02")
    cfg = yaml.safe_load((Path(__file__).parents[1] / "ingest" / "sites" / "site-A.yaml").read_text())
    cfg["site"] = "site-C"
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "site-C.yaml").write_text(yaml.safe_dump(cfg))
    assert run_ingest(src, tmp_path, sites_dir=tmp_path / "sites", prune=True)["written"] == 2
    stores = sorted((tmp_path / "raw").rglob("*.zarr"))
    summary = run_ingest(src, tmp_path, prune=True)   # this time without site C's file
    assert summary["pruned"] == 0 and summary["prune_held"] > 0 and summary["orphans"] == 1, summary
    assert sorted((tmp_path / "raw").rglob("*.zarr")) == stores
    # a copy of a site file saved under another site's name, still saying the first site
    (tmp_path / "sites" / "site-D.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"site-D.yaml: says site 'site-C'; a site file is named after its site"):
        run_ingest(src, tmp_path, sites_dir=tmp_path / "sites")
    # stores or a manifest inside SRC would be read as input by the next run
    from ingest.service import IngestError, ingest

    with pytest.raises(IngestError, match="is inside the input folder"):
        ingest(src, src / "stores", manifest=tmp_path / "m.csv", jobs=1)
    with pytest.raises(IngestError, match="is inside the input folder"):
        ingest(src, tmp_path / "raw", manifest=src / "manifest.csv", jobs=1)


def test_a_worker_that_dies_costs_only_its_exam(demo_tree, tmp_path, monkeypatch):
    import multiprocessing

    import ingest.service as service

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the monkeypatched exam reaches the workers through fork")
    src = tmp_path / "data"
    small_exam(demo_tree, src / "site-A" / "sub-A01")
    small_exam(demo_tree, src / "site-B" / "sub-B01", site="site-B", exam="sub-B01")
    real = service.ingest_exam

    def dying(src_, dst, job, *a, **kw):
        if job.site == "site-B":
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
        return real(src_, dst, job, *a, **kw)

    monkeypatch.setattr(service, "ingest_exam", dying)
    summary = run_ingest(src, tmp_path, jobs=2)
    assert summary["written"] == 1 and summary["no_store"] == 1, summary
    by = rows_by_folder(tmp_path)
    assert {r["status"] for r in by["sub-A01"]} == {"ingested"}
    assert all(r["status"] == "quarantined" and "worker ingesting this exam died" in r["reason"] for r in by["sub-B01"])
    assert len(by["sub-A01"]) + len(by["sub-B01"]) == len(input_files(src))


def test_no_exam_under_src_is_an_error_and_prunes_nothing(demo_tree, tmp_path):
    src = tmp_path / "data"
    small_exam(demo_tree, src / "site-A" / "sub-A01")
    run_ingest(src, tmp_path, prune=True)
    stores, manifest = sorted((tmp_path / "raw").rglob("*.zarr")), (tmp_path / "manifest.csv").read_bytes()
    for wrong in (tmp_path / "empty", src / "site-A"):  # an unmounted share; a site folder, not the root
        wrong.mkdir(exist_ok=True)
        res = qsnet("ingest", str(wrong), str(tmp_path / "raw"), "--manifest", str(tmp_path / "manifest.csv"),
                    "--prune", "--jobs", "1")
        assert res.returncode != 0, res.stdout
        errors = [line for line in res.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "no <site>/<exam>/ DICOM folders" in errors[0] and str(wrong) in errors[0]
        assert sorted((tmp_path / "raw").rglob("*.zarr")) == stores
        assert (tmp_path / "manifest.csv").read_bytes() == manifest
    # a run that fails leaves no output folders behind it made for nothing
    res = qsnet("ingest", str(tmp_path / "empty"), str(tmp_path / "new" / "raw"), "--jobs", "1")
    assert res.returncode != 0 and not (tmp_path / "new").exists()
    # a manifest that cannot be written is found before any store is, not after all of them
    (tmp_path / "a-file").write_text("")
    res = qsnet("ingest", str(src), str(tmp_path / "raw2"), "--manifest", str(tmp_path / "a-file" / "m.csv"))
    assert res.returncode != 0 and not (tmp_path / "raw2").exists()
    assert f"{tmp_path / 'a-file' / 'm.csv'}: cannot write the manifest there" in res.stderr, res.stderr


def test_reasons_carry_no_uids_absolute_paths_or_names(demo_tree, tmp_path):
    src = tmp_path / "data"
    ex = small_exam(demo_tree, src / "site-A" / "sub-A01", roles=("mrf_t1", "mrf_t2", "t1w"))
    t1 = sorted(series_dir_of(ex, header(series_dir_of(ex, "MRF_FISP_T1map")).SeriesDescription).iterdir())
    # a screen save whose description names someone (synthetic) with a date
    shot = ex / "S099_screensave"
    shot.mkdir()
    ds = pydicom.dcmread(t1[0])
    ds.SeriesInstanceUID, ds.SeriesNumber = pydicom.uid.generate_uid(), 99
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesDescription = "Screen Save ROE^RICHARD 19991231"
    ds.save_as(shot / "IM0001.dcm")
    # a re-sent copy of one image, and a series with a slice missing
    shutil.copy(t1[4], t1[4].parent / "IM_resend.dcm")
    sop = str(pydicom.dcmread(t1[4], stop_before_pixels=True).SOPInstanceUID)
    mrf_t2 = sorted(series_dir_of(ex, "MRF_FISP_T2map").iterdir())
    mrf_t2[len(mrf_t2) // 2].unlink()
    run_ingest(src, tmp_path)
    rows = {r["path"]: r for r in manifest_rows(tmp_path / "manifest.csv")}
    assert "duplicate" in rows[str((t1[4].parent / "IM_resend.dcm").relative_to(src))]["reason"]
    assert "missing" in rows[str(mrf_t2[0].relative_to(src))]["reason"]
    assert "matches no role" in rows["site-A/sub-A01/S099_screensave/IM0001.dcm"]["reason"]
    reasons = " ".join(r["reason"] for r in rows.values())
    for needle in (sop, str(tmp_path), "ROE", "RICHARD", "19991231"):
        assert needle not in reasons, needle


def test_the_patients_own_identifiers_are_scrubbed_from_descriptions(demo_tree, tmp_path):
    src = tmp_path / "data"
    ex = small_exam(demo_tree, src / "site-A" / "sub-A01")
    who = header(ex)
    family, given = str(who.PatientName).split("^")[:2]
    # the institution's own word, as an operator abbreviates it ("Northgate" of "Northgate University Hospital")
    place = str(who.InstitutionName).split()[0]
    typed = [str(who.PatientID), f"{given.title()} {family.title()}", str(who.AccessionNumber), place]
    edit(series_dir_of(ex, "MRF_FISP_T1map"),
         lambda ds: setattr(ds, "SeriesDescription", f"MRF_FISP_T1map {' '.join(typed)}"))
    run_ingest(src, tmp_path)
    (store,) = (tmp_path / "raw").rglob("*.zarr")
    assert open_store(store).attrs_of("mrf_t1")["series_description"] == "MRF_FISP_T1map"
    text = " ".join(p.read_text() for p in store.rglob("zarr.json")).casefold()
    for needle in (str(who.PatientID), family, given, str(who.AccessionNumber), place):
        assert needle.casefold() not in text, needle


def test_pydicom_warnings_do_not_echo_header_values(demo_tree, tmp_path):
    from pydicom import config

    src = tmp_path / "data"
    ex = small_exam(demo_tree, src / "site-A" / "sub-A01")
    marker = "QSNETSYNTH7"  # a non-conformant UID that carries an ID, as some exports write them
    with config.disable_value_validation():  # writing it would warn here, in the test, too
        edit(ex, lambda ds: setattr(ds, "StudyInstanceUID", f"1.2.826.0.1.{marker}.20240517"))
    res = qsnet("ingest", str(src), str(tmp_path / "raw"), "--manifest", str(tmp_path / "m.csv"), "--jobs", "2")
    assert res.returncode == 0, res.stderr
    assert marker not in res.stderr and marker not in res.stdout
    # in process too; and quiet for ingest's own reads only: the process's settings stay as they were
    before = config.settings._reading_validation_mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_ingest(src, tmp_path / "inproc")
    assert not [w for w in caught if marker in str(w.message)]
    assert config.settings._reading_validation_mode == before


def test_visits_of_one_patient_share_a_split(demo_tree, tmp_path):
    from ingest.deid import load_key, pseudonym
    from ingest.service import _split
    from ingest.siteconfig import load_site

    src = tmp_path / "data"
    v1 = small_exam(demo_tree, src / "site-A" / "visit1")
    v2 = small_exam(demo_tree, src / "site-A" / "visit2")
    who = header(v1)
    key, cfg, frac = load_key()[0], load_site("site-A"), {"site-A": 20 / 32, "site-B": 9 / 18}
    visit = lambda study: _split(pseudonym(key, "site-A", str(who.PatientID), study), cfg, frac)  # noqa: E731
    # a second visit whose own pseudonym would fall in the other split
    study2 = next(u for u in (f"2.25.{1000 + i}" for i in range(200)) if visit(u) != visit(str(who.StudyInstanceUID)))
    edit(v2, lambda ds: setattr(ds, "StudyInstanceUID", study2))
    run_ingest(src, tmp_path)
    attrs = [open_store(s).attrs for s in sorted((tmp_path / "raw").rglob("*.zarr"))]
    assert len(attrs) == 2 and attrs[0]["patient"] == attrs[1]["patient"]
    assert attrs[0]["split"] == attrs[1]["split"]


@pytest.mark.parametrize("change", ["no SeriesNumber", "another PixelSpacing"])
def test_one_slice_with_other_headers_never_replaces_its_series(demo_tree, tmp_path, change):
    """One slice split off its series (a header that disagrees) sorted first and was kept as the
    role's one-slice volume, the rest of the series ignored as "a second series"; silently."""
    src = tmp_path / "data"
    ex = small_exam(demo_tree, src / "site-A" / "sub-A01", roles=("mrf_t1", "mrf_t2", "t2w"))
    t2 = sorted((ex / series_dir(demo_tree / "site-A" / "sub-A01", "t2w").name).iterdir())
    ds = pydicom.dcmread(t2[0])
    if change == "no SeriesNumber":
        del ds.SeriesNumber
    else:
        ds.PixelSpacing = [3.3, 3.3]
    ds.save_as(t2[0])
    summary = run_ingest(src, tmp_path)
    (store,) = (tmp_path / "raw").rglob("*.zarr")
    assert open_store(store).read("t2w").shape[0] == len(t2) - 1
    rows = {r["path"]: r for r in manifest_rows(tmp_path / "manifest.csv")}
    odd = rows[str(t2[0].relative_to(src))]
    assert odd["status"] == "quarantined" and "left out of the volume" in odd["reason"]
    assert ("SeriesNumber" if change == "no SeriesNumber" else "PixelSpacing") in odd["reason"]
    assert all(rows[str(p.relative_to(src))]["status"] == "ingested" for p in t2[1:])
    assert summary["quarantined"] == 1


def test_every_series_names_are_scrubbed_and_quoted_paths_stay_whole(demo_tree, tmp_path):
    """The scrub knew only the exam's first file: a series sent again under a corrected
    PatientName, or the referring physician typed into a description, reached the store. And it
    ran over the paths a reason quotes: an exam folder named by the PatientID lost its name."""
    src = tmp_path / "data"
    ex = small_exam(demo_tree, src / "site-A" / "PID0042", roles=("mrf_t1", "mrf_t2", "t2w"))
    edit(ex, lambda ds: (setattr(ds, "PatientID", "PID0042"), setattr(ds, "ReferringPhysicianName", "Zzref^Anna")))
    edit(ex / series_dir(demo_tree / "site-A" / "sub-A01", "mrf_t2").name,
         lambda ds: (setattr(ds, "PatientName", "Zznewname^Alice"),
                     setattr(ds, "SeriesDescription", f"{ds.SeriesDescription} Alice Zznewname Anna Zzref")))
    t2 = ex / series_dir(demo_tree / "site-A" / "sub-A01", "t2w").name
    gap = sorted(t2.iterdir())
    gap[len(gap) // 2].unlink()  # a missing slice: its reason quotes the neighbours' paths
    run_ingest(src, tmp_path)
    rows = manifest_rows(tmp_path / "manifest.csv")
    reason = next(r["reason"] for r in rows if r["path"].startswith(f"site-A/PID0042/{t2.name}/"))
    assert "missing slice" in reason and f"site-A/PID0042/{t2.name}/{gap[len(gap) // 2 - 1].name}" in reason
    text = " ".join(r["reason"] for r in rows).replace("site-A/PID0042/", "")
    (store,) = (tmp_path / "raw").rglob("*.zarr")
    assert open_store(store).attrs_of("mrf_t2")["series_description"] == "MRF_FISP_T2map"
    text += " ".join(p.read_text() for p in store.rglob("zarr.json"))
    for needle in ("Zznewname", "Zzref", "PID0042"):
        assert needle.casefold() not in text.casefold(), needle


def test_a_whole_exam_failure_is_scrubbed_with_every_series_names(demo_tree, tmp_path, monkeypatch):
    """An exam that fails as a whole quotes its exception; that reason used to be scrubbed with
    the first file's names only, so a name from another series' header could pass."""
    import ingest.service as service

    src = tmp_path / "data"
    ex = small_exam(demo_tree, src / "site-A" / "sub-A01", roles=("mrf_t1", "mrf_t2"))
    edit(ex / series_dir(demo_tree / "site-A" / "sub-A01", "mrf_t2").name,
         lambda ds: setattr(ds, "PatientName", "Zznewname^Alice"))

    def fails(*a, **kw):
        raise ValueError("series 'T2 map Alice Zznewname' has no readable slice")

    monkeypatch.setattr(service, "ingest_exam", fails)
    run_ingest(src, tmp_path)
    rows = manifest_rows(tmp_path / "manifest.csv")
    assert rows and all(r["status"] == "quarantined" for r in rows)
    assert "exam failed (ValueError: series 'T2 map" in rows[0]["reason"], rows[0]["reason"]
    assert not any("zznewname" in r["reason"].casefold() or "alice" in r["reason"].casefold() for r in rows)


def test_ground_truth_of_an_exam_without_mrf_t1_says_so(demo_tree, tmp_path):
    src = tmp_path / "data"
    ex = src / "site-A" / "sub-A01"
    shutil.copytree(demo_tree / "site-A" / "sub-A01", ex)
    shutil.rmtree(ex / series_dir(demo_tree / "site-A" / "sub-A01", "mrf_t1").name)
    run_ingest(src, tmp_path)
    rows = {r["path"]: r for r in manifest_rows(tmp_path / "manifest.csv")}
    labels = rows["site-A/sub-A01/truth/labels.nii.gz"]
    assert labels["status"] == "quarantined" and "this exam has no MRF T1 map" in labels["reason"], labels
    (store,) = (tmp_path / "raw").rglob("*.zarr")
    assert "labels" not in open_store(store).roles and "t1w" in open_store(store).roles


def test_kinds_of_one_enhanced_object_are_series_of_their_own(demo_tree, tmp_path):
    """A B0 map (magnitude and field-map frames in one enhanced file) beside an exam: the role
    gets the kind its rule names, a rule that accepts both is an actionable quarantine, and the
    file is one manifest row either way."""
    import yaml
    from test_ingest_reader import AXIAL, make_affine, volume, write_enhanced

    src = tmp_path / "data"
    exam = small_exam(demo_tree, src / "site-A" / "sub-A01")
    first = header(exam)
    aff = make_affine(AXIAL, (5, 5))
    vols = np.stack([volume((4, 6, 7), seed=s) for s in (8, 9)])
    kinds = ["ORIGINAL\\PRIMARY\\T1\\M", "ORIGINAL\\PRIMARY\\T1\\FIELD_MAP"]
    b0 = exam / "S099_B0" / "b0.dcm"
    b0.parent.mkdir()
    write_enhanced(b0, vols, aff, [(t, z) for t in range(2) for z in range(4)], np.ones((2, 4)),
                   series_uid="1.2.826.0.1.3680043.8.498.99", frame_types=kinds)
    ds = pydicom.dcmread(b0)
    ds.StudyInstanceUID, ds.PatientID, ds.SeriesDescription = first.StudyInstanceUID, first.PatientID, "B0_map"
    ds.save_as(b0)

    def run(rule: dict) -> list[dict]:
        cfg = yaml.safe_load((Path(__file__).parents[1] / "ingest" / "sites" / "site-A.yaml").read_text())
        cfg["series"]["swi"]["match"] = rule
        (tmp_path / "sites").mkdir(exist_ok=True)
        (tmp_path / "sites" / "site-A.yaml").write_text(yaml.safe_dump(cfg))
        run_ingest(src, tmp_path, sites_dir=tmp_path / "sites", prune=True)
        rows = manifest_rows(tmp_path / "manifest.csv")
        assert len(rows) == len([p for p in src.rglob("*") if p.is_file()])
        return [r for r in rows if r["path"].endswith("b0.dcm")]

    (row,) = run({"description": "^B0_map$", "image_type_all": []})
    assert row["status"] == "quarantined" and "holds frames of 2 kinds" in row["reason"], row
    (row,) = run({"description": "^B0_map$", "image_type_all": ["M"]})
    assert row["status"] == "ingested" and row["role"] == "swi", row
    from ingest.store import open_store

    store = next((tmp_path / "raw" / "site-A").glob("*.zarr"))
    np.testing.assert_array_equal(np.asarray(open_store(store).array("swi")[:]), vols[0])


def test_echoes_of_one_series_need_a_rule_that_names_one(demo_tree, tmp_path):
    """A dual-echo TSE (echo 1 PD-, echo 2 T2-weighted) whose description matches t2w: the
    first echo must not become the exam's T2w because it sorts first."""
    import yaml
    from test_ingest_reader import AXIAL, make_affine, volume, write_classic

    src = tmp_path / "data"
    exam = small_exam(demo_tree, src / "site-A" / "sub-A01")
    first = header(exam)
    aff = make_affine(AXIAL, (0, 0))
    vols = [volume((3, 6, 7), seed=s) for s in (11, 12)]
    for echo, (vol, te) in enumerate(zip(vols, (12.0, 96.0)), start=1):
        folder = exam / "S050_t2_tse_dual"
        paths = write_classic(folder, vol, aff, names=f"E{echo}_", series_uid="1.2.826.0.1.3680043.8.498.50",
                              description="t2_tse_tra_dual")
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.StudyInstanceUID, ds.PatientID = first.StudyInstanceUID, first.PatientID
            ds.EchoNumbers, ds.EchoTime, ds.ImageType = echo, te, ["ORIGINAL", "PRIMARY", "M"]
            ds.save_as(p)

    def run(rule_extra: dict) -> list[dict]:
        cfg = yaml.safe_load((Path(__file__).parents[1] / "ingest" / "sites" / "site-A.yaml").read_text())
        cfg["series"]["t2w"]["match"].update(rule_extra)
        (tmp_path / "sites").mkdir(exist_ok=True)
        (tmp_path / "sites" / "site-A.yaml").write_text(yaml.safe_dump(cfg))
        run_ingest(src, tmp_path, sites_dir=tmp_path / "sites", prune=True)
        rows = [r for r in manifest_rows(tmp_path / "manifest.csv") if "S050" in r["path"]]
        assert len(rows) == 6
        return rows

    rows = run({})
    assert all(r["status"] == "quarantined" and "has echoes 1, 2" in r["reason"] and "echo: N" in r["reason"]
               for r in rows), rows
    rows = run({"echo": 2})
    assert sorted((r["path"].split("/")[-1][:2], r["status"]) for r in rows) == \
        [("E1", "ignored")] * 3 + [("E2", "ingested")] * 3
    from ingest.store import open_store

    store = next((tmp_path / "raw" / "site-A").glob("*.zarr"))
    np.testing.assert_array_equal(np.asarray(open_store(store).array("t2w")[:]), vols[1])


@pytest.mark.parametrize("text, why", [
    ("site: site-C\nseries:\n  t1w: {match: {description: '(?i)mprage'\n", "not valid YAML at line"),
    ("site: site-C\nseries:\n  t1w: {match: {descripton: '(?i)mprage'}}\n", "unknown key(s) descripton"),
    ("site: site-C\nseries:\n  t2w: {match: {description: 't2['}}\n", "not a regular expression"),
    ("site: site-C\nseries:\n  t2_w: {match: {description: t2}}\n", "series 't2_w' is not a role"),
    ("site: site-C\nseries:\n  t2w: {match: {echo: 0}}\n", "must be an echo number"),
    ("site: site-C\nseries:\n  t2w: {match: {image_type_all: ORIGINAL}}\n", "must be a list"),
    ("- just a list\n", "needs 'site' and 'series'"),
    ("site: site-C\nseries:\n  t2w: {match: {description: 12}}\n", "must be a regular expression in quotes"),
])
def test_site_file_mistakes_fail_at_load_in_one_line(tmp_path, text, why):
    """A misspelt match key would match every series; a broken file must name itself."""
    from ingest.siteconfig import SiteConfigError, load_site

    path = tmp_path / "site-C.yaml"
    path.write_text(text)
    with pytest.raises(SiteConfigError) as err:
        load_site(path)
    assert str(err.value).startswith(str(path)) and why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("other", ["PHASE", "REAL"])
def test_role_takes_the_magnitude_of_a_series_that_holds_phase_too(demo_tree, tmp_path, other):
    """A GE SWAN exported with its phase (or real) images in the same series (one UID, one
    ImageType, the component only in GE's private image type): the swi role gets the magnitude
    volume, the other files are ignored with the reason, and neither is stacked onto the other."""
    from test_ingest_reader import _ge_complex_series

    from ingest.store import open_store

    src = tmp_path / "data"
    exam = small_exam(demo_tree, src / "site-A" / "sub-A01")
    first = header(exam)
    paths, mag, _ = _ge_complex_series(exam / "S060_SWAN", components=(0, {"PHASE": 1, "REAL": 2}[other]))
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.PatientID = first.StudyInstanceUID, first.PatientID
        ds.SeriesDescription = "SWI_Images"
        ds.save_as(p)
    run_ingest(src, tmp_path)
    rows = [r for r in manifest_rows(tmp_path / "manifest.csv") if "S060" in r["path"]]
    assert len(rows) == 10
    role_of_other = "" if other == "PHASE" else "swi"  # real images are eligible, the magnitude preferred
    assert sorted((r["path"].split("/")[-1][:2], r["status"], r["role"]) for r in rows) == \
        [("C0", "ingested", "swi")] * 5 + [("C" + str({"PHASE": 1, "REAL": 2}[other]), "ignored", role_of_other)] * 5, rows
    why = "PHASE images: roles take magnitude images" if other == "PHASE" else "REAL images of series"
    assert all(why in r["reason"] for r in rows if r["status"] == "ignored"), rows
    store = next((tmp_path / "raw" / "site-A").glob("*.zarr"))
    np.testing.assert_array_equal(np.asarray(open_store(store).array("swi")[:]), mag)


@pytest.mark.parametrize("grey, same_uid", [(True, False), (False, False), (True, True)])
def test_a_colour_copy_matching_a_role_never_stands_in_for_it(demo_tree, tmp_path, grey, same_uid):
    """A colour (RGB) copy of the SWI sent beside it, with a description the role's rules match,
    also one filed under the SWI's own SeriesInstanceUID and number (a series part of its own,
    whose files sort first): beside the greyscale series it is ignored and the store holds the
    greyscale volume; alone, its files are quarantined, saying the role has no greyscale series
    (the role is lost, a person must act). Colour is never stacked into a role's array."""
    from test_ingest_reader import write_colour

    from ingest.reader import read_series
    from ingest.store import open_store

    src = tmp_path / "data"
    exam = small_exam(demo_tree, src / "site-A" / "sub-A01", roles=("mrf_t1", "mrf_t2", "swi"))
    swi = series_dir(demo_tree / "site-A" / "sub-A01", "swi")
    vol, aff, _ = read_series(sorted(swi.iterdir()))
    first = header(exam)
    grey8 = np.clip(vol / vol.max() * 255, 0, 255).astype(np.uint8)
    swi_hdr = header(swi)
    write_colour(exam / "S001_SWI_fused", np.repeat(grey8[..., None], 3, axis=-1), aff,
                 series_number=swi_hdr.SeriesNumber if same_uid else 1,
                 series_uid=swi_hdr.SeriesInstanceUID if same_uid else pydicom.uid.generate_uid(),
                 # the SWI's own ImageType: only the colour tells the two parts apart
                 description="SWI_Images", ImageType=list(swi_hdr.ImageType),
                 StudyInstanceUID=first.StudyInstanceUID, PatientID=first.PatientID, PatientName=first.PatientName)
    if not grey:
        shutil.rmtree(exam / swi.name)
    run_ingest(src, tmp_path)
    every = manifest_rows(tmp_path / "manifest.csv")
    rows = [r for r in every if "S001_SWI_fused" in r["path"]]
    assert len(rows) == grey8.shape[0]
    if grey:
        assert {r["status"] for r in every if swi.name in r["path"]} == {"ingested"}
    assert {r["status"] for r in rows} == {"ignored" if grey else "quarantined"}, rows
    assert all("colour (RGB) images of series" in r["reason"] and "role swi takes greyscale" in r["reason"]
               for r in rows), rows
    st = open_store(next((tmp_path / "raw" / "site-A").glob("*.zarr")))
    if grey:
        np.testing.assert_array_equal(np.asarray(st.array("swi")[:]), vol)
    else:
        assert "swi" not in st.roles and "no greyscale series of this role was read" in rows[0]["reason"]
