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
