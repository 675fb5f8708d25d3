"""`qsnet serve` end to end on loopback: a phantom site-B exam's MRF DICOM in, five synthetic DICOM
series out (geometry, UIDs, study, pixels against the offline synthesis of the same exam), the
other input and output formats, every kind of bad request (each followed by /healthz), no PHI in
the server's log, and the viewer page in a real (headless Debian chromium) browser."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for niftiref
from niftiref import reindexed  # noqa: E402

CONTRASTS = ("t1w", "t2w", "t1flair", "t2flair", "swi")
KEY = "test-key-0123456789"
UID_ROOT = "1.2.3.4.5."  # a site's own root (serve.yaml uid_root): new UIDs start with it
LIMITS = {"max_request_bytes": 4 << 20, "max_unpacked_bytes": 64 << 20, "max_ratio": 200, "max_entries": 500,
          "max_concurrent_uploads": 2, "queue_timeout_s": 1.0, "idle_timeout_s": 15.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _zip_dirs(root: Path, folders) -> bytes:
    return _zip({f"{d.name}/{f.name}": f.read_bytes() for d in folders for f in sorted(d.iterdir())})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Untrained QS-Net models (weights do not matter to serving): pretrain on site A, finetune on site B."""
    import torch

    from ingest.prepare.service import config, input_contract
    from train import registry as reg
    from train.models import build

    root = tmp_path_factory.mktemp("registry")
    contract = input_contract(config({"prepare": {"image_size": 64}}))
    torch.manual_seed(0)
    for stage, site in (("pretrain", "site-A"), ("finetune", "site-B")):
        for c in CONTRASTS:
            m = build("qsnet", in_channels=2, out_channels=1, width=8)
            reg.save(root / stage / "qsnet" / c, m.generator, {
                "architecture": "qsnet", "build": m.config, "contrast": c, "inputs": "mrf", "stage": stage,
                "trained_on": {"site": site}, "params_hash": "test", "input": contract})
    # an MRI-input model and a card without an input contract: listed as not served
    m = build("qsnet", in_channels=2, out_channels=1, width=8)
    reg.save(root / "pretrain" / "qsnet-mri" / "t1w", m.generator, {
        "architecture": "qsnet", "build": m.config, "contrast": "t1w", "inputs": "mri", "stage": "pretrain",
        "input": contract})
    reg.save(root / "pretrain" / "cgan" / "t1w", m.generator, {
        "architecture": "qsnet", "build": m.config, "contrast": "t1w", "inputs": "mrf", "stage": "pretrain"})
    # trained before prepare indexed every grid in one order: its slices may have been turned
    reg.save(root / "pretrain" / "resunet" / "t1w", m.generator, {
        "architecture": "qsnet", "build": m.config, "contrast": "t1w", "inputs": "mrf", "stage": "pretrain",
        "input": {k: v for k, v in contract.items() if k != "orientation"}})
    return root


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    """`qsnet serve` in its own process, on loopback, with an API key and small request limits."""
    import yaml

    tmp = tmp_path_factory.mktemp("serve")
    cfg = tmp / "serve.yaml"
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "platform" / "serve.yaml").read_text())
    app = doc["applications"][0]
    app["args"]["limits"] = LIMITS
    app["args"]["uid_root"] = UID_ROOT
    for d in app["deployments"]:  # a 2-core machine: one replica each
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    cfg.write_text(yaml.safe_dump(doc))
    port = _free_port()
    log = tmp / "server.log"
    env = {**os.environ, "QSNET_API_KEYS": f"other-key,{KEY}", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "ingest", "serve", "--models", str(registry), "--port", str(port),
                                 "--config", str(cfg)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"qsnet serve did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    yield {"base": base, "client": client, "log": log, "proc": proc}
    client.close()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def exam_b(demo_tree) -> Path:
    return demo_tree / "site-B" / "sub-B01"


@pytest.fixture(scope="module")
def mrf_zip(exam_b) -> bytes:
    return _zip_dirs(exam_b, sorted(exam_b.glob("S70*")))


@pytest.fixture(scope="module")
def answer(server, mrf_zip, tmp_path_factory) -> Path:
    r = server["client"].post("/v1/synthesize", content=mrf_zip, headers={"Content-Type": "application/zip"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert "model;dur=" in r.headers["server-timing"]
    out = tmp_path_factory.mktemp("answer")
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    return out


@pytest.fixture(scope="module")
def offline(raw_pair, tmp_path_factory):
    """The same exam through `qsnet prepare` (the offline path evaluate reads)."""
    from ingest.prepare.service import prepare

    root = tmp_path_factory.mktemp("offline")
    src = root / "raw" / "site-B"
    shutil.copytree(raw_pair["site-B"], src / raw_pair["site-B"].name)
    prepare(root / "raw", root / "prepared", root / "prepare.json", {"prepare": {"image_size": 64}, "seed": 0}, jobs=1)
    stores = list((root / "prepared" / "site-B").glob("*.zarr"))
    assert len(stores) == 1, (root / "prepare.json").read_text()
    return stores[0]


def _series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def _volume(dss, affine) -> np.ndarray:
    inv = np.linalg.inv(affine)
    z = {int(round((inv @ np.r_[np.asarray(d.ImagePositionPatient, float), 1])[0])): d for d in dss}
    return np.stack([z[k].pixel_array.astype(np.int32) for k in range(len(z))])


def test_five_dicom_series_on_the_mrf_geometry_in_the_original_study(answer, exam_b):
    src = _series(exam_b / "S700_MRF-FISP_T1_Map")
    src_at = {tuple(np.round(np.asarray(d.ImagePositionPatient, float), 3)): d for d in src}
    src_uids = {d.SOPInstanceUID for d in src} | {d.SeriesInstanceUID for d in src}
    series_uids, sop_uids = set(), set()
    record = json.loads((answer / "synthesis.json").read_text())
    assert set(record["contrasts"]) == set(CONTRASTS) and record["site"] == "site-B"
    for c in CONTRASTS:
        out = _series(answer / c)
        assert len(out) == len(src)
        assert len({d.SeriesInstanceUID for d in out}) == 1
        # one number per contrast, whichever contrasts a request asks for
        assert {d.SeriesNumber for d in out} == {9900 + CONTRASTS.index(c)}
        series_uids.add(out[0].SeriesInstanceUID)
        for d in out:
            s = src_at[tuple(np.round(np.asarray(d.ImagePositionPatient, float), 3))]
            assert list(d.ImagePositionPatient) == list(s.ImagePositionPatient)
            assert list(d.ImageOrientationPatient) == list(s.ImageOrientationPatient)
            assert list(d.PixelSpacing) == list(s.PixelSpacing)
            assert (d.Rows, d.Columns) == (s.Rows, s.Columns)
            assert d.StudyInstanceUID == s.StudyInstanceUID and d.FrameOfReferenceUID == s.FrameOfReferenceUID
            assert d.PatientID == s.PatientID
            assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
            assert d.ImageType[0] == "DERIVED" and "SYNTHETIC" in d.ImageType
            assert d.SeriesDescription.startswith("SYNTHETIC") and "finetune/qsnet" in d.SeriesDescription
            assert "Not an acquired image" in d.DerivationDescription
            assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == s.SOPInstanceUID
            for uid in (d.SOPInstanceUID, d.SeriesInstanceUID):
                assert pydicom.uid.UID(uid).is_valid and uid not in src_uids and uid.startswith(UID_ROOT)
            sop_uids.add(d.SOPInstanceUID)
            assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
    assert len(series_uids) == 5 and len(sop_uids) == 5 * len(src)


def test_pixels_match_the_offline_synthesis(answer, offline, registry):
    """Served pixels = the offline path (prepared store -> evaluate's forward -> back on the MRF
    grid, 12-bit) within rounding."""
    from ingest.store import open_store
    from serve.dicomout import to_stored
    from train import registry as reg
    from train.data import exam_input
    from train.evaluate.service import predict

    store = open_store(offline)
    x = exam_input(store)
    inv = store.attrs["inversion"]
    affine = np.asarray(inv["native_affine_lps"], float)
    for c in CONTRASTS:
        pred = predict(reg.load(registry / "finetune" / "qsnet" / c / "card.json"), x)
        want = to_stored(pred, store.read("brain"), inv).astype(np.int32)
        got = _volume(_series(answer / c), affine)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1, c
        assert want.max() > 0


def test_nifti_out_and_nifti_and_store_uploads_agree(server, mrf_zip, raw_pair, tmp_path):
    import nibabel as nib

    from ingest.nifti import RAS_TO_LPS, load_nifti_zyx, save_nifti
    from ingest.store import open_store

    cl = server["client"]
    r = cl.post("/v1/synthesize?contrasts=t1w,swi&format=nifti", content=mrf_zip)
    assert r.status_code == 200, r.text
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == ["swi.nii.gz", "synthesis.json", "t1w.nii.gz"]
    z.extractall(tmp_path / "a")
    ref, ref_aff = load_nifti_zyx(tmp_path / "a" / "t1w.nii.gz")
    st = open_store(raw_pair["site-B"])
    assert np.allclose(ref_aff, st.attrs_of("mrf_t1")["affine_lps"], atol=1e-4)
    # the same maps as a NIfTI pair, and as the exam store ingest writes: the same answer
    for role in ("mrf_t1", "mrf_t2"):
        save_nifti(tmp_path / f"{role}.nii.gz", st.read(role), np.asarray(st.attrs_of(role)["affine_lps"]))
    pair = _zip({f"maps/{r}.nii.gz": (tmp_path / f"{r}.nii.gz").read_bytes() for r in ("mrf_t1", "mrf_t2")})
    top = raw_pair["site-B"]
    files = {str(p.relative_to(top.parent)): p.read_bytes() for p in top.rglob("*")
             if p.is_file() and (p.parent == top or p.relative_to(top).parts[0] in ("mrf_t1", "mrf_t2"))}
    for i, body in enumerate((pair, _zip(files))):
        r = cl.post("/v1/synthesize?contrasts=t1w&site=site-B", content=body)
        assert r.status_code == 200, r.text
        zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / f"b{i}")
        got, aff = load_nifti_zyx(tmp_path / f"b{i}" / "t1w.nii.gz")
        # NIfTI stores the affine in float32: the resampling moves by at most one 12-bit step
        assert np.abs(got.astype(np.int32) - ref).max() <= (0 if i else 1), i
        assert np.allclose(aff, ref_aff, atol=1e-4)
    # the same maps with their rows stored the other way up (another phase-encoding direction
    # or vendor): the same synthesis, written back in the upload's own row order
    flipped = _nifti_pair(tmp_path, top, lambda r, v, a: reindexed(v, a, "rows flipped"))
    r = cl.post("/v1/synthesize?contrasts=t1w&site=site-B", content=flipped)
    assert r.status_code == 200, r.text
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / "flipped")
    got, aff = load_nifti_zyx(tmp_path / "flipped" / "t1w.nii.gz")
    want, want_aff = reindexed(ref, ref_aff, "rows flipped")
    assert np.allclose(aff, want_aff, atol=1e-4)
    assert np.abs(got.astype(np.int32) - want).max() <= 1
    # an aligned sform (code 2, 10 mm off) beside the scanner qform, rows and columns swapped:
    # the same synthesis, in the upload's voxel order, with the upload's own forms
    def shifted(a):
        ras = RAS_TO_LPS @ a[:, [2, 1, 0, 3]]          # (z, y, x) LPS -> NIfTI's (x, y, z) RAS
        aligned = ras.copy()
        aligned[0, 3] += 10.0
        return {"sform": aligned, "sform_code": 2, "qform": ras, "qform_code": 1}

    body = _nifti_pair(tmp_path, top, lambda r, v, a: reindexed(v, a, "transposed"), forms=shifted)
    r = cl.post("/v1/synthesize?contrasts=t1w&site=site-B", content=body)
    assert r.status_code == 200, r.text
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / "sideways")
    got, _ = load_nifti_zyx(tmp_path / "sideways" / "t1w.nii.gz")
    assert np.abs(got.transpose(0, 2, 1).astype(np.int32) - ref).max() <= 1
    sent, back = (nib.load(str(p)).header for p in (tmp_path / "mrf_t1.nii.gz", tmp_path / "sideways" / "t1w.nii.gz"))
    for form in ("get_sform", "get_qform"):
        (a, ca), (b, cb) = getattr(sent, form)(coded=True), getattr(back, form)(coded=True)
        assert ca == cb and np.allclose(a, b, atol=1e-4), form
    r = cl.post("/v1/synthesize?format=dicom", content=pair)
    assert r.status_code == 422 and r.json()["error"]["code"] == "dicom_needs_dicom"


def test_models_health_and_openapi(server):
    cl = server["client"]
    doc = cl.get("/v1/models").json()
    ids = sorted(m["id"] for m in doc["models"])
    assert ids == sorted(f"{s}/qsnet/{c}" for s in ("pretrain", "finetune") for c in CONTRASTS)
    assert not any("_path" in m for m in doc["models"])
    assert any("qsnet-mri" in w for w in doc["not_served"]) and any("input contract" in w for w in doc["not_served"])
    assert any(w.startswith("pretrain/resunet/t1w: ") and "own voxel order" in w for w in doc["not_served"])
    assert cl.get("/healthz").json() == {"status": "ok"}
    assert cl.get("/readyz").json()["status"] == "ready"
    spec = cl.get("/openapi.json").json()
    op = spec["paths"]["/v1/synthesize"]["post"]
    assert {"application/zip", "multipart/form-data"} <= set(op["requestBody"]["content"])
    assert {"200", "400", "401", "413", "422"} <= set(op["responses"])
    assert {"contrasts", "site", "model", "format"} <= {p["name"] for p in op["parameters"]}
    assert "Error" in spec["components"]["schemas"]
    page = httpx.get(server["base"] + "/")
    assert page.status_code == 200 and "v1/synthesize" in page.text


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("S1/bomb.dcm", b"\0" * (48 << 20))
    return buf.getvalue()


def _traversal() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../etc/evil.dcm", b"x")
    return buf.getvalue()


def _nifti_pair(tmp: Path, raw: Path, edit, forms=None) -> bytes:
    """The MRF maps of ``raw`` as a zipped NIfTI pair, each ``(vol, affine) = edit(role, vol, affine)``,
    written with ``forms(affine)`` as their sform/qform when given (see ``save_nifti``)."""
    from ingest.nifti import save_nifti
    from ingest.store import open_store

    st = open_store(raw)
    files = {}
    for role in ("mrf_t1", "mrf_t2"):
        vol, aff = edit(role, st.read(role), np.asarray(st.attrs_of(role)["affine_lps"]))
        p = tmp / f"{role}.nii.gz"
        save_nifti(p, vol, aff, forms(aff) if forms else None)
        files[f"{role}.nii.gz"] = p.read_bytes()
    return _zip(files)


def _store_edited(tmp: Path, raw: Path, edit) -> bytes:
    """The exam store of ``raw`` with each map's attributes passed through ``edit``, zipped."""
    from ingest.store import open_store, write_exam_store

    st = open_store(raw)
    arrays = {r: (st.read(r), edit(dict(st.attrs_of(r)))) for r in ("mrf_t1", "mrf_t2")}
    write_exam_store(tmp / "x.zarr", arrays, dict(st.attrs))
    return _zip({str(p.relative_to(tmp)): p.read_bytes() for p in (tmp / "x.zarr").rglob("*") if p.is_file()})


def _twice(exam: Path) -> bytes:
    """The MRF map series with one slice's name given to a second, different file."""
    import warnings

    files = [(f"{d.name}/{f.name}", f.read_bytes()) for d in sorted(exam.glob("S70*")) for f in sorted(d.iterdir())]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        for name, data in files:
            zf.writestr(name, data)
        zf.writestr(files[0][0], files[1][1])
    return buf.getvalue()


def _corrupt_chunk(tmp: Path, raw: Path) -> bytes:
    """The exam store of ``raw`` with bytes inside a compressed chunk of mrf_t1 flipped (its
    shard index intact): zstd finds the damage when the map is read."""
    _store_edited(tmp, raw, lambda a: a)
    shard = tmp / "x.zarr" / "mrf_t1" / "c.0.0.0"
    b = bytearray(shard.read_bytes())
    for i in range(len(b) // 3, len(b) // 3 + 64):
        b[i] ^= 0x5A
    shard.write_bytes(bytes(b))
    return _zip({str(p.relative_to(tmp)): p.read_bytes() for p in (tmp / "x.zarr").rglob("*") if p.is_file()})


def _declared_huge(tmp: Path, kind: str) -> bytes:
    """A few hundred bytes that declare maps of 2^31 voxels: a store's metadata without its chunks,
    or a .nii.gz header (compressed a second time inside the zip) whose data never come."""

    import nibabel as nib

    from ingest.store import write_exam_store

    if kind == "nifti":
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((2048, 2048, 512))
        hdr.set_data_dtype(np.float32)
        hdr.set_sform(np.eye(4), code=1)
        hdr.set_data_offset(352)
        buf = io.BytesIO()
        hdr.write_to(buf)
        return _zip({f"{role}.nii.gz": gzip.compress(buf.getvalue() + bytes(4)) for role in ("mrf_t1", "mrf_t2")})
    aff = {"affine_lps": np.eye(4).tolist(), "units": "ms"}
    write_exam_store(tmp / "x.zarr", {r: (np.ones((2, 4, 4), np.float32), aff) for r in ("mrf_t1", "mrf_t2")},
                     {"site": "site-B"})
    for role in ("mrf_t1", "mrf_t2"):
        meta = json.loads((tmp / "x.zarr" / role / "zarr.json").read_text())
        meta["shape"] = [512, 2048, 2048]
        (tmp / "x.zarr" / role / "zarr.json").write_text(json.dumps(meta))
    return _zip({str(p.relative_to(tmp)): p.read_bytes() for p in (tmp / "x.zarr").rglob("*") if p.is_file()})


def _not_a_qsnet_store(tmp: Path, raw: Path) -> bytes:
    """An exam store whose group lacks qsnet's schema_version: the refusal must not name the server's path."""
    _store_edited(tmp, raw, lambda a: a)
    meta = json.loads((tmp / "x.zarr" / "zarr.json").read_text())
    meta["attributes"].pop("schema_version", None)
    (tmp / "x.zarr" / "zarr.json").write_text(json.dumps(meta))
    return _zip({str(p.relative_to(tmp)): p.read_bytes() for p in (tmp / "x.zarr").rglob("*") if p.is_file()})


def _repeated_t1(exam: Path) -> bytes:
    """The exam's MRF maps plus a repeat of its T1 map series (new UIDs, next series number)."""
    from pydicom.uid import generate_uid

    files = {}
    for d in sorted(exam.glob("S70*")):
        for f in sorted(d.iterdir()):
            files[f"{d.name}/{f.name}"] = f.read_bytes()
    series_uid = generate_uid()
    for f in sorted((exam / "S700_MRF-FISP_T1_Map").iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 702
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buf = io.BytesIO()
        ds.save_as(buf)
        files[f"S702_repeat/{f.name}"] = buf.getvalue()
    return _zip(files)


def _damaged_deflate() -> bytes:
    """A zip whose one deflated entry has bytes flipped inside its compressed stream: zlib, not
    zipfile, raises on it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("S1/a.dcm", bytes(range(256)) * 64)
    raw = bytearray(buf.getvalue())
    start = 30 + len("S1/a.dcm")  # past the local header
    for i in range(start + 2, start + 12):
        raw[i] ^= 0xFF
    return bytes(raw)


def _rgb(v: np.ndarray) -> np.ndarray:
    out = np.zeros(v.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    out["R"] = np.clip(v / 20.0, 0, 255).astype(np.uint8)
    return out


BAD = {
    "not a zip": (lambda ctx: b"this is not a zip archive", "", 400, "not_a_zip"),
    "path traversal": (lambda ctx: _traversal(), "", 400, "unsafe_zip_path"),
    "zip bomb": (lambda ctx: _bomb(), "", 413, "zip_bomb"),
    "too large": (lambda ctx: os.urandom(5 << 20), "", 413, "request_too_large"),
    "empty body": (lambda ctx: b"", "", 400, "empty_body"),
    "DICOM that is not MRF": (lambda ctx: _zip_dirs(ctx["exam"], [ctx["exam"] / "S003_Ax_T1_BRAVO"]), "", 422,
                              "not_mrf"),
    "two MRF T1 map series": (lambda ctx: _repeated_t1(ctx["exam"]), "", 422, "several_mrf_series"),
    "a store declaring huge maps": (lambda ctx: _declared_huge(ctx["tmp"], "store"), "", 413, "map_too_large"),
    "a NIfTI declaring huge maps": (lambda ctx: _declared_huge(ctx["tmp"], "nifti"), "", 413, "map_too_large"),
    "a store without qsnet's attributes": (lambda ctx: _not_a_qsnet_store(ctx["tmp"], ctx["raw"]), "", 422, "bad_store"),
    "a T1 map series missing a slice": (lambda ctx: _zip({
        f"{d.name}/{f.name}": f.read_bytes() for d in sorted(ctx["exam"].glob("S70*"))
        for i, f in enumerate(sorted(d.iterdir())) if not (d.name.startswith("S700") and i == 5)}), "", 422,
        "bad_mrf_series"),
    # a slice short, the synthetic series came back with no word of the missing top slice
    "the last slice of each map cut short": (lambda ctx: _zip({
        f"{d.name}/{f.name}": f.read_bytes()[:-500] if i == len(list(d.iterdir())) - 1 else f.read_bytes()
        for d in sorted(ctx["exam"].glob("S70*")) for i, f in enumerate(sorted(d.iterdir()))}), "", 422, "bad_dicom"),
    "maps in seconds": (lambda ctx: _nifti_pair(ctx["tmp"], ctx["raw"], lambda r, v, a: (v / 1000.0, a)), "", 422,
                        "bad_maps"),
    "store units not ms": (lambda ctx: _store_edited(ctx["tmp"], ctx["raw"], lambda a: {**a, "units": "s"}), "", 422,
                           "wrong_units"),
    "maps of different shapes": (lambda ctx: _nifti_pair(ctx["tmp"], ctx["raw"], lambda r, v, a: (
        v[:, :-3] if r == "mrf_t2" else v, a)), "", 422, "bad_maps"),
    "NIfTI without orientation": (lambda ctx: _nifti_pair(ctx["tmp"], ctx["raw"], lambda r, v, a: (v, a), forms=lambda a: {
        "sform": None, "sform_code": 0, "qform": None, "qform_code": 0}), "", 422, "no_geometry"),
    "NIfTI with a collapsed axis": (lambda ctx: _nifti_pair(ctx["tmp"], ctx["raw"], lambda r, v, a: (v, a), forms=lambda a: {
        "sform": np.diag([0.0, 1.0, 1.0, 1.0]), "sform_code": 1, "qform": None, "qform_code": 0}), "", 422, "bad_maps"),
    "maps in sagittal slices": (lambda ctx: _nifti_pair(ctx["tmp"], ctx["raw"], lambda r, v, a: (v, a[:, [2, 1, 0, 3]])),
                                "", 422, "bad_maps"),
    "a store of sagittal maps": (lambda ctx: _store_edited(ctx["tmp"], ctx["raw"], lambda a: {
        **a, "affine_lps": np.asarray(a["affine_lps"])[:, [2, 1, 0, 3]].tolist()}), "", 422, "bad_maps"),
    "a store with a corrupt chunk": (lambda ctx: _corrupt_chunk(ctx["tmp"], ctx["raw"]), "", 422, "bad_store"),
    "store without affine": (lambda ctx: _store_edited(ctx["tmp"], ctx["raw"], lambda a: (
        {k: v for k, v in a.items() if k != "affine_lps"})), "", 422, "bad_store"),
    "a zip entry twice": (lambda ctx: _twice(ctx["exam"]), "", 400, "duplicate_zip_entry"),
    "a file and a folder of one name": (lambda ctx: _zip({"S1": b"x", "S1/a.dcm": b"y"}), "", 400, "bad_zip"),
    "a deflated entry with damaged bytes": (lambda ctx: _damaged_deflate(), "", 400, "bad_zip"),
    "a NIfTI beside the DICOM maps": (lambda ctx: _zip({
        **{f"{d.name}/{f.name}": f.read_bytes() for d in sorted(ctx["exam"].glob("S70*")) for f in sorted(d.iterdir())},
        "mask.nii.gz": gzip.compress(bytes(352))}), "", 422, "mixed_upload"),
    # older PACS exports write data sets without the preamble and "DICM": still DICOM
    "a NIfTI beside bare DICOM maps": (lambda ctx: _zip({
        **{f"{d.name}/{f.name}": f.read_bytes()[132:] for d in sorted(ctx["exam"].glob("S70*"))
           for f in sorted(d.iterdir())},
        "mask.nii.gz": gzip.compress(bytes(352))}), "", 422, "mixed_upload"),
    "RGB NIfTI maps": (lambda ctx: _nifti_pair(ctx["tmp"], ctx["raw"], lambda r, v, a: (_rgb(v), a)), "", 422,
                       "bad_nifti"),
    "unknown contrast": (lambda ctx: ctx["zip"], "?contrasts=t1w,dwi", 422, "unknown_contrast"),
    "unknown model": (lambda ctx: ctx["zip"], "?model=unet3d", 404, "no_model"),
    "unknown site": (lambda ctx: ctx["zip"], "?site=site-Z", 422, "unknown_site"),
    "unknown format": (lambda ctx: ctx["zip"], "?format=png", 422, "unknown_format"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_and_the_server_stays_healthy(server, case, mrf_zip, exam_b, raw_pair, tmp_path):
    make, query, status, code = BAD[case]
    body = make({"exam": exam_b, "raw": raw_pair["site-B"], "tmp": tmp_path, "zip": mrf_zip})
    r = server["client"].post(f"/v1/synthesize{query}", content=body, headers={"Content-Type": "application/zip"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["status"] == status and err["message"]
    assert not re.search(r"(?:^|[\s'(:])/[\w.-]+/", err["message"]), err["message"]  # no server path
    assert httpx.get(server["base"] + "/healthz", timeout=10).status_code == 200


def test_api_keys(server, mrf_zip):
    url = server["base"] + "/v1/synthesize"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": "Bearer cl\u00e9-\u00fc".encode("utf-8")}):   # non-ASCII: not a 500
        r = httpx.post(url, content=mrf_zip, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(server["base"] + "/v1/models", timeout=10).status_code == 401
    r = httpx.get(server["base"] + "/v1/models", headers={"Authorization": "Bearer other-key"}, timeout=10)
    assert r.status_code == 200


def test_stalled_uploads_time_out_and_never_hold_the_health_probe(server, mrf_zip):
    """Uploads that stop sending take the ingress's upload turns (2 here), not its other slots:
    /healthz answers at once, a third exam is told to come back (503, Retry-After), and after
    the idle timeout the stalled ones get 408 and their turns are free again."""
    stalled = []
    for _ in range(LIMITS["max_concurrent_uploads"]):
        s = socket.create_connection(("127.0.0.1", int(server["base"].rsplit(":", 1)[1])), timeout=30)
        s.sendall(f"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/zip\r\nContent-Length: 100000\r\n\r\n".encode() + mrf_zip[:1000])
        stalled.append(s)
    try:
        time.sleep(3)   # both reach the replica and wait for the rest of their bodies
        t = time.perf_counter()
        assert httpx.get(server["base"] + "/healthz", timeout=5).status_code == 200
        assert time.perf_counter() - t < 5   # well inside the idle timeout: not queued behind the uploads
        r = server["client"].post("/v1/synthesize", content=mrf_zip, headers={"Content-Type": "application/zip"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "busy", r.text
        assert r.headers["Retry-After"] == "5"
        for s in stalled:
            answer = b""   # the idle timeout (15 s) ends them; headers and body may come apart
            while b"request_timeout" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            answer = answer.decode(errors="replace")
            assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer, answer[:300]
    finally:
        for s in stalled:
            s.close()
    r = server["client"].post("/v1/synthesize", content=b"", headers={"Content-Type": "application/zip"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_body"   # the turns came back


def test_multipart_bodies_are_held_to_the_limits(server, mrf_zip):
    """A multipart upload is counted as it arrives, as a raw one is: sent chunked (no
    Content-Length) it would otherwise be spooled whole before any check; a form that cannot be
    parsed is the client's error, not the server's."""
    url = server["base"] + "/v1/synthesize"
    auth = {"Authorization": f"Bearer {KEY}"}

    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n\r\n"
        for _ in range(6):
            yield bytes(1 << 20)

    r = httpx.post(url, content=chunks(), headers={**auth, "Content-Type": "multipart/form-data; boundary=x"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, content=b"--x\r\nnot a form", headers={**auth, "Content-Type": "multipart/form-data"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_multipart", r.text
    r = httpx.post(url, files={"file": ("exam.zip", mrf_zip, "application/zip")}, data={"contrasts": "t1w"},
                   headers=auth, timeout=300)
    assert r.status_code == 200, r.text


def test_a_client_that_hangs_up_mid_upload_is_not_a_server_failure(server, mrf_zip):
    """A client gone before its body arrived is the client's doing: logged as such, never as a 500
    (which pages whoever watches the server's error rate). Which of two ways it is logged is a
    race: the replica's body read sees the hang-up ("refused 499 client_disconnected"), or Serve's
    proxy sees it first and cancels the request ("cancelled by Serve", or only the proxy's own
    line when the handler had not started); a loaded machine gives the second. Either is right;
    a failure or a 500 is not."""
    def hang_ups(text):
        return (text.count("client_disconnected") + text.count("cancelled by Serve")
                + text.count("disconnected, cancelling request"))

    start = server["log"].read_text(errors="replace")
    before = hang_ups(start)
    s = socket.create_connection(("127.0.0.1", int(server["base"].rsplit(":", 1)[1])), timeout=30)
    s.sendall(f"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
              "Content-Type: application/zip\r\nContent-Length: 100000\r\n\r\n".encode() + mrf_zip[:1000])
    time.sleep(1.5)   # the replica is reading the body
    s.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        text = server["log"].read_text(errors="replace")
        if hang_ups(text) > before:
            break
        time.sleep(0.5)
    time.sleep(2)   # the replica's own lines, if the proxy's came first
    text = server["log"].read_text(errors="replace")
    tail = text[len(start):][-4000:]   # this test's lines only
    assert hang_ups(text) > before, tail
    assert "status 500" not in tail and "failed (" not in tail and " 500 " not in tail, tail
    r = server["client"].post("/v1/synthesize", content=b"", headers={"Content-Type": "application/zip"})
    assert r.status_code == 400   # its upload turn came back


def test_no_phi_in_the_server_log(server, answer, exam_b):
    """Names, IDs, dates and UIDs of the uploaded exam never reach the log."""
    ds = pydicom.dcmread(next((exam_b / "S700_MRF-FISP_T1_Map").iterdir()))
    text = server["log"].read_text(errors="replace")
    assert "synthesize" in text  # the requests were logged
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber",
               "InstitutionName", "ReferringPhysicianName"):
        v = str(ds.get(kw, "") or "")
        if len(v) >= 4:
            assert v not in text, kw


def test_a_non_conformant_uid_of_an_upload_stays_out_of_the_server_log(server, exam_b, tmp_path):
    """A StudyInstanceUID with a leading zero in a component (common in older exports) made
    pydicom's validation warning quote it into the replica's log when the write-back read the
    headers again: the replica is quiet for all its reads, whichever request's thread runs them."""
    import warnings

    marker = "0471902"
    files = {}
    for d in sorted(exam_b.glob("S70*")):
        for f in sorted(d.iterdir()):
            ds = pydicom.dcmread(f)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.StudyInstanceUID = f"1.2.826.{marker}.5"
            buf = io.BytesIO()
            ds.save_as(buf)
            files[f"{d.name}/{f.name}"] = buf.getvalue()
    r = server["client"].post("/v1/synthesize?contrasts=t1w", content=_zip(files),
                              headers={"Content-Type": "application/zip"})
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        first = next(n for n in zf.namelist() if n.startswith("t1w/"))
        assert pydicom.dcmread(io.BytesIO(zf.read(first))).StudyInstanceUID == f"1.2.826.{marker}.5"
    time.sleep(2)  # the replica's output reaches the log through Ray's log forwarding
    assert marker not in server["log"].read_text(errors="replace")


def test_write_back_does_not_quote_header_values_into_the_log(exam_b, caplog):
    """Study and patient elements are copied into the synthetic series as they are (the series
    belongs to the patient's study), without pydicom re-validating them: its warning about a
    non-conformant value (a birth date written 1965-11-09, common in real exports) would quote
    the value into the replica's log."""
    import logging
    import warnings

    from serve.dicomout import dicom_series

    files = sorted((exam_b / "S700_MRF-FISP_T1_Map").iterdir())
    h = pydicom.dcmread(files[0], stop_before_pixels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h.PatientBirthDate, h.StudyTime = "1965-11-09", "17:31:00"
    del h.SOPClassUID  # the scan accepts a SOP Class UID given only in the file meta
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the edits above were logged
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = dicom_series(np.zeros((1, h.Rows, h.Columns)), {0: h}, {}, "t1w", {"id": "m"}, 900)
    said = caplog.text + "\n".join(str(w.message) for w in seen)
    assert "1965-11-09" not in said and "17:31:00" not in said
    ds = pydicom.dcmread(io.BytesIO(out[0][1]))
    assert ds.PatientBirthDate == "1965-11-09" and ds.StudyInstanceUID == h.StudyInstanceUID


def test_refuses_a_public_address_without_api_keys(registry):
    env = {k: v for k, v in os.environ.items() if k != "QSNET_API_KEYS"}
    r = subprocess.run([sys.executable, "-m", "ingest", "serve", "--models", str(registry), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "without API keys" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_viewer_in_a_real_browser(server, exam_b, tmp_path):
    """Debian's chromium, headless, driven by Playwright: upload, see seven panels, move the slider."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (scripts/setup.sh installs Debian's package when run as root)")
    upload = tmp_path / "exam.zip"
    upload.write_bytes(_zip_dirs(exam_b, sorted(exam_b.glob("S70*"))))
    shots = Path(os.environ.get("QSNET_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server["base"] + "/")
        page.set_input_files("#file", str(upload))
        page.fill("#key", KEY)
        page.click("#go")
        page.wait_for_function("/^(Done|Failed)/.test(document.getElementById('status').textContent)",
                               timeout=180_000)
        assert page.inner_text("#status").startswith("Done"), page.inner_text("#status")
        assert page.locator("#grid figure").count() == 7
        assert "T1-FLAIR (synthetic)" in page.inner_text("#grid")
        first = page.get_attribute("#grid img >> nth=2", "src")
        page.fill("#slider", "2")
        page.dispatch_event("#slider", "input")
        assert page.get_attribute("#grid img >> nth=2", "src") != first
        assert page.get_attribute("#download", "href").startswith("blob:")
        page.fill("#slider", str(int(page.get_attribute("#slider", "max")) // 2))
        page.dispatch_event("#slider", "input")
        shot = shots / "viewer.png"
        page.screenshot(path=str(shot), full_page=True)
        # a wrong key: the page says why
        page.fill("#key", "wrong")
        page.click("#go")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Failed')", timeout=60_000)
        assert "401" in page.inner_text("#status")
        browser.close()
    assert not errors, errors
    assert shot.stat().st_size > 10_000
    print(f"viewer screenshot: {shot}")


def test_every_torch_call_of_the_synthesizer_runs_on_one_thread(registry, tmp_path):
    """The replica's loads and forwards (its two torch calls) of concurrent requests share one
    thread: a forward on another thread gives GNU OpenMP another worker team, and with more teams
    than cores every forward slows. A torch call added elsewhere needs its own count here.
    (Serve's local testing mode has no replica context for model multiplexing: a real Ray.)"""
    script = tmp_path / "one_thread.py"
    script.write_text(f"""
import concurrent.futures as cf, json, sys
import numpy as np, ray
from ray import serve
from serve.app import Synthesizer
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
h = serve.run(Synthesizer.options(ray_actor_options={{"num_cpus": 2}}).bind({str(registry)!r}),
              name="one-thread", route_prefix=None)
x = np.random.default_rng(0).random((3, 2, 64, 64), dtype=np.float32)
ids = [f"{{s}}/qsnet/{{c}}" for s in ("pretrain", "finetune") for c in ("t1w", "t2w", "swi")]
with cf.ThreadPoolExecutor(6) as pool:
    ys = list(pool.map(lambda mid: h.synthesize.remote(mid, x).result(), ids * 2))
assert all(y.shape == (3, 64, 64) and np.isfinite(y).all() for y in ys)
print("STATS", json.dumps(h.stats.remote().result()))
serve.shutdown()
ray.shutdown()
""")
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("STATS ")), None)
    assert res.returncode == 0 and line, res.stderr[-3000:]
    stats = json.loads(line[6:])
    assert stats["forwards"] >= 6 and stats["torch_calling_threads"] == 1, stats


def test_serve_config_validates_with_rays_schema(registry):
    """platform/serve.yaml is a valid Serve config, and `qsnet serve --config` reads the same args."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app
    from serve.cli import load_config

    path = Path(__file__).resolve().parents[1] / "platform" / "serve.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.applications[0].import_path == "serve.app:build_app"
    cfg = load_config(path)
    assert set(cfg["args"]["deployments"]) == {"Synthesizer", "Ingress"}
    build_app({**cfg["args"], "models": str(registry)})
    with pytest.raises(ValueError, match="unknown name"):
        build_app({"models": str(registry), "deployments": {"Synth": {}}})
    with pytest.raises(ValueError, match="unknown request limit"):
        build_app({"models": str(registry), "limits": {"max_size": 1}})


@pytest.mark.parametrize("model_name", ["SIGNA Premier", "Discovery MR750w"])
def test_a_site_is_a_scanner_not_a_vendor(exam_b, tmp_path, model_name):
    """Site B's GE scanner is recognised as site B; another GE model is an unknown site (which
    gets the pretrained models), not site B with its finetuned ones."""
    from ingest.service import load_sites
    from serve.exam import read_exam, unpack

    files = {}
    for d in sorted(exam_b.glob("S70*")):
        for f in sorted(d.iterdir()):
            ds = pydicom.dcmread(f)
            ds.ManufacturerModelName = model_name
            b = io.BytesIO()
            ds.save_as(b, enforce_file_format=True)
            files[f"{d.name}/{f.name}"] = b.getvalue()
    exam = read_exam(unpack(_zip(files), tmp_path / "u"), load_sites(None), None, tmp_path / "s")
    assert exam.site == ("site-B" if model_name == "SIGNA Premier" else None)


@pytest.mark.parametrize("names, picked", [
    (("mrf_t1", "mrf_t2"), ("mrf_t1", "mrf_t2")),
    (("T1map", "T2map"), ("T1map", "T2map")),
    (("pat12_t1", "pat12_t2"), ("pat12_t1", "pat12_t2")),   # the t1 of "pat12t2" is no word
    (("MRF_T1_fit1", "MRF_T2_fit1"), ("MRF_T1_fit1", "MRF_T2_fit1")),
])
def test_nifti_maps_are_picked_by_a_word_of_their_name(raw_pair, tmp_path, names, picked):
    from ingest.nifti import save_nifti
    from ingest.service import load_sites
    from ingest.store import open_store
    from serve.exam import read_exam

    st = open_store(raw_pair["site-B"])
    (tmp_path / "u").mkdir()
    for role, name in zip(("mrf_t1", "mrf_t2"), names):
        save_nifti(tmp_path / "u" / f"{name}.nii.gz", st.read(role), np.asarray(st.attrs_of(role)["affine_lps"]))
    exam = read_exam(tmp_path / "u", load_sites(None), None, tmp_path / "s")
    assert np.array_equal(exam.t1, st.read("mrf_t1").astype(np.float32))
    assert np.array_equal(exam.t2, st.read("mrf_t2").astype(np.float32))


def test_a_4d_nifti_map_is_named_as_such(raw_pair, tmp_path):
    import nibabel as nib

    from ingest.service import load_sites
    from serve.exam import RequestError, read_exam

    for role in ("mrf_t1", "mrf_t2"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 3, 1), np.float32), np.eye(4)), str(tmp_path / f"{role}.nii.gz"))
    with pytest.raises(RequestError) as err:
        read_exam(tmp_path, load_sites(None), None, tmp_path / "s")
    assert err.value.code == "wrong_shape" and "4-D image (4, 4, 3, 1)" in err.value.message


def test_write_back_reads_bare_dicom_and_refuses_a_short_series_before_the_models(exam_b, tmp_path):
    """Files without preamble, which ingest reads, carry a write-back too; a T1 map series that
    cannot is refused when the headers are read, which the app does before any forward."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    from ingest.service import load_sites
    from serve.dicomout import dicom_series, source_headers
    from serve.exam import read_exam

    for d in sorted(exam_b.glob("S70*")):
        for f in sorted(d.iterdir()):
            ds = pydicom.dcmread(f)
            del ds.file_meta
            (tmp_path / "u" / d.name).mkdir(parents=True, exist_ok=True)
            with open(tmp_path / "u" / d.name / f.name, "wb") as fh:
                out = DicomFileLike(fh)
                out.is_little_endian, out.is_implicit_VR = True, True
                write_dataset(out, ds)
    exam = read_exam(tmp_path / "u", load_sites(None), None, tmp_path / "s")
    z = exam.t1.shape[0]
    t1_at, t2_at = source_headers(exam.affine, z, exam.sources["mrf_t1"], exam.sources["mrf_t2"])
    assert sorted(t1_at) == list(range(z)) and sorted(t2_at) == list(range(z))
    with pytest.raises(ValueError, match=f"has {z - 1} single-frame slices on its grid, expected {z}"):
        source_headers(exam.affine, z, exam.sources["mrf_t1"][1:], exam.sources["mrf_t2"])
    # without a SOP Class UID anywhere (ingest takes such files), a source slice is not referenced:
    # a reference needs both UIDs; before, the write-back failed with a 500 after the models ran
    for h in t1_at.values():
        del h.SOPClassUID
    files = dicom_series(np.zeros(exam.t1.shape, np.uint16), t1_at, t2_at, "t1w", {"id": "m"}, 9900)
    ref = pydicom.dcmread(io.BytesIO(files[0][1]))
    assert [r.ReferencedSOPClassUID for r in ref.SourceImageSequence] == [t2_at[0].SOPClassUID]


def test_a_damaged_slice_is_refused_and_a_stray_file_is_a_note(exam_b, tmp_path):
    """A truncated slice file refuses the request, naming it (the synthesis would be a slice
    short); a file that is no DICOM image is kept as a note of the answer, not dropped unsaid."""
    from ingest.service import load_sites
    from serve.exam import RequestError, read_exam

    up = tmp_path / "u"
    for d in sorted(exam_b.glob("S70*")):
        shutil.copytree(d, up / d.name)
    (up / "README.txt").write_text("exported maps\n")
    exam = read_exam(up, load_sites(None), None, tmp_path / "s1")
    assert exam.notes == ["README.txt: not DICOM (no 'DICM' signature after the 128-byte preamble)"]
    last = sorted((up / "S700_MRF-FISP_T1_Map").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-500])
    with pytest.raises(RequestError) as e:
        read_exam(up, load_sites(None), None, tmp_path / "s2")
    assert e.value.code == "bad_dicom" and e.value.status == 422
    assert str(e.value).startswith(f"S700_MRF-FISP_T1_Map/{last.name}: pixel data truncated")
    assert str(tmp_path) not in str(e.value)


def test_write_back_needs_the_study_and_keeps_the_maps_lossy_flag(exam_b, tmp_path):
    """Without a StudyInstanceUID (Type 1) a series cannot be filed in its exam: refused when
    the headers are read, before the models. Maps that were lossy-compressed stay flagged, and
    the acquisition type is the MRF series' own."""
    from ingest.service import load_sites
    from serve.dicomout import check_uid_root, dicom_series, source_headers
    from serve.exam import read_exam

    for d in sorted(exam_b.glob("S70*")):
        (tmp_path / "u" / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir()):
            ds = pydicom.dcmread(f)
            del ds.StudyInstanceUID
            ds.save_as(tmp_path / "u" / d.name / f.name)
    exam = read_exam(tmp_path / "u", load_sites(None), None, tmp_path / "s")
    with pytest.raises(ValueError, match="has no StudyInstanceUID"):
        source_headers(exam.affine, exam.t1.shape[0], exam.sources["mrf_t1"], exam.sources["mrf_t2"])

    for d in sorted(exam_b.glob("S70*")):
        shutil.copytree(d, tmp_path / "v" / d.name)
    exam = read_exam(tmp_path / "v", load_sites(None), None, tmp_path / "s2")
    heads = source_headers(exam.affine, exam.t1.shape[0], exam.sources["mrf_t1"], exam.sources["mrf_t2"])
    stored = np.zeros(exam.t1.shape, np.uint16)
    out = pydicom.dcmread(io.BytesIO(dicom_series(stored, *heads, "t1w", {"id": "m"}, 9900)[0][1]))
    assert out.LossyImageCompression == "00"
    assert out.MRAcquisitionType == heads[0][0].get("MRAcquisitionType", "")
    heads[1][1].LossyImageCompression = "01"
    out = pydicom.dcmread(io.BytesIO(dicom_series(stored, *heads, "t1w", {"id": "m"}, 9900)[0][1]))
    assert out.LossyImageCompression == "01"
    # a resent answer has the same UIDs (a PACS drops the duplicate); other pixels, another
    # contrast or other weights get new ones
    uids = lambda files: [pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for _, b in files]  # noqa: E731
    a = dicom_series(stored, *heads, "t1w", {"id": "m", "weights_sha256": "ab"}, 9900)
    assert uids(a) == uids(dicom_series(stored, *heads, "t1w", {"id": "m", "weights_sha256": "ab"}, 9900))
    assert len(set(uids(a))) == len(a)
    other = stored.copy()
    other[0, 0, 0] = 1
    for b in (dicom_series(other, *heads, "t1w", {"id": "m", "weights_sha256": "ab"}, 9900),
              dicom_series(stored, *heads, "t2w", {"id": "m", "weights_sha256": "ab"}, 9901),
              dicom_series(stored, *heads, "t1w", {"id": "m", "weights_sha256": "cd"}, 9900)):
        assert not set(uids(a)) & set(uids(b))
    # a root that leaves fewer than 24 random digits of the 64 is refused
    assert check_uid_root("1." + "2." * 19) == "1." + "2." * 19
    with pytest.raises(ValueError, match="at most 40 characters"):
        check_uid_root("1." + "2." * 20)


def test_a_prediction_that_is_not_finite_is_not_written():
    """A diverged model's NaN, clipped and cast, was a blank series answered with a 200."""
    from serve.dicomout import to_stored

    z, y, x = 3, 8, 8
    pred = np.full((z, y, x), 0.5, np.float32)
    pred[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        to_stored(pred, np.ones((z, y, x), np.uint8), {})


def test_write_back_of_maps_an_anonymiser_stripped(exam_b, tmp_path):
    """Type 2 elements the source lacks are written empty, and a missing FrameOfReferenceUID
    (Type 1) is made once per request, shared by every series of it."""
    from ingest.service import load_sites
    from serve.dicomout import dicom_series, source_headers
    from serve.exam import read_exam

    for d in sorted(exam_b.glob("S70*")):
        (tmp_path / "u" / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir()):
            ds = pydicom.dcmread(f)
            for kw in ("FrameOfReferenceUID", "PatientBirthDate", "AccessionNumber", "StudyID"):
                if kw in ds:
                    delattr(ds, kw)
            ds.save_as(tmp_path / "u" / d.name / f.name)
    exam = read_exam(tmp_path / "u", load_sites(None), None, tmp_path / "s")
    z, y, x = exam.t1.shape
    heads = source_headers(exam.affine, z, exam.sources["mrf_t1"], exam.sources["mrf_t2"], UID_ROOT)
    frames = set()
    for i, c in enumerate(("t1w", "swi")):
        files = dicom_series(np.zeros((z, y, x), np.uint16), *heads, c, {"id": "x"}, series_number=9900 + i)
        out = [pydicom.dcmread(io.BytesIO(b)) for _, b in files]
        frames |= {d.FrameOfReferenceUID for d in out}
        for d in out:
            assert d.PatientBirthDate == "" and d.AccessionNumber == "" and d.StudyID == ""
            assert d.PatientID == pydicom.dcmread(exam.sources["mrf_t1"][0]).PatientID
    frame = frames.pop()
    assert not frames and pydicom.uid.UID(frame).is_valid and frame.startswith(UID_ROOT)
    # without a root of the site's, pydicom's (not generate_uid(None)'s 2.25 UUID form)
    files = dicom_series(np.zeros((z, y, x), np.uint16), *heads, "t2w", {"id": "x"}, series_number=9901)
    assert pydicom.dcmread(io.BytesIO(files[0][1])).SOPInstanceUID.startswith(pydicom.uid.PYDICOM_ROOT_UID)


@pytest.mark.parametrize("text, why", [("- a\n", "not a Serve config"),
                                       ("applications: [foo]\n", "needs an application"),
                                       ("applications:\n- import_path: serve.app:build_app\n  args: [1]\n",
                                        "the application.s args must be a mapping"),
                                       ("applications:\n- import_path: serve.app:build_app\n  args: {api_keys: 5}\n",
                                        "api_keys must be a list of strings"),
                                       ("applications:\n- import_path: serve.app:build_app\n  deployments: [{x: 1}]\n",
                                        "each deployment must be a mapping with a name"),
                                       # unquoted, YAML reads 1. as the number 1.0
                                       ("applications:\n- import_path: serve.app:build_app\n  args: {uid_root: 1.}\n",
                                        "uid_root '1.0': not a UID root"),
                                       ("applications:\n- import_path: serve.app:build_app\n  args: {uid_root: '1.02.3.'}\n",
                                        "uid_root '1.02.3.': not a UID root")])
def test_a_malformed_serve_config_is_one_line_naming_the_file(tmp_path, text, why):
    from serve.cli import load_config

    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"serve.yaml: {why}"):
        load_config(path)


@pytest.mark.parametrize("limits, why", [({"max_concurrent_uploads": 0}, "max_concurrent_uploads must be a positive"),
                                         ({"max_concurrent_uploads": 2.5}, "must be a whole number"),
                                         ({"queue_timeout_s": "30"}, "queue_timeout_s must be a positive number"),
                                         ({"idle_timeout_s": True}, "idle_timeout_s must be a positive number"),
                                         ({"max_uploads": 3}, "unknown request limit")])
def test_bad_request_limits_fail_at_deploy_time(limits, why):
    from serve.exam import Limits

    with pytest.raises(ValueError, match=why):
        Limits.from_dict(limits)
