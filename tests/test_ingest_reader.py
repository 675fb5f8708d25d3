"""Tests of ingest.reader (read_series) and ingest.series (scan, group_series).

Golden tests: every real vendor series under ../shared/testdata/dicom/*/*/In must equal
the dcm2niix conversion in its sibling Ref/ folder (voxels and geometry). Unit tests
write small synthetic DICOM files with pydicom into tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for niftiref

from ingest.reader import SeriesError, parse_csa_header, read_series, siemens_csa_image_header  # noqa: E402
from ingest.series import FileInfo, group_series, scan  # noqa: E402
from niftiref import compare_to_nifti, rot  # noqa: E402


def _testdata() -> Path:
    if os.environ.get("QSNET_TESTDATA"):
        return Path(os.environ["QSNET_TESTDATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "testdata"


TESTDATA = _testdata() / "dicom"
GOLDEN = sorted(TESTDATA.glob("*/*/In")) if TESTDATA.is_dir() else []
DCM2NIIX = shutil.which("dcm2niix")
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def check_with_dcm2niix(got, gaff, tmp_path) -> None:
    """dcm2niix converts tmp_path/in, and our read equals its NIfTI (voxels, affine within 0.01 mm)."""
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([DCM2NIIX, "-b", "n", "-z", "n", "-f", "v", "-o", str(out), str(tmp_path / "in")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    compare_to_nifti(got, gaff, next(out.glob("*.nii")), atol_mm=0.01)


# ----------------------------------------------------------------------- golden tests

@pytest.mark.skipif(not GOLDEN, reason=f"shared test data not found at {TESTDATA}")
@pytest.mark.parametrize("series_in", GOLDEN, ids=[str(p.parent.relative_to(TESTDATA)) for p in GOLDEN])
def test_golden_series_equals_dcm2niix(series_in: Path):
    files = sorted(p for p in series_in.iterdir() if p.is_file())
    vol, affine, meta = read_series(files)
    refs = [p for p in (series_in.parent / "Ref").iterdir() if p.name.endswith((".nii", ".nii.gz"))]
    assert len(refs) == 1
    # Voxels are compared as scanner values after RescaleSlope/Intercept; dcm2niix writes
    # the same (stored ints + scl_slope/scl_inter), so no vendor convention is needed here.
    compare_to_nifti(vol, affine, refs[0], atol_mm=0.01)
    assert vol.dtype == np.float32
    assert meta["n_files"] == len(files)
    assert meta["n_volumes"] == (vol.shape[0] if vol.ndim == 4 else 1)
    assert meta["n_slices"] == vol.shape[-3]
    # slices ascend along the normal (row x column cosine)
    normal = np.cross(affine[:3, 2], affine[:3, 1])
    assert float(affine[:3, 0] @ normal) > 0


@pytest.mark.skipif(not GOLDEN, reason="shared test data not found")
def test_golden_meta_and_grouping_of_the_whole_tree():
    infos, problems = scan(TESTDATA)
    assert all(not str(p).endswith(".dcm") for p, _ in problems), problems
    groups, dups = group_series(infos)
    assert not dups
    # dcm_qa_ts: nine files share one SeriesInstanceUID -> nine series (by SeriesNumber);
    # dcm_qa_philips_enh: classic and enhanced export share UID and number -> two parts
    assert len(groups) == len(GOLDEN)
    folders = sorted({tuple(sorted({f.parent for f in g.files})) for g in groups})
    assert all(len(f) == 1 for f in folders)
    assert sorted(f[0] for f in folders) == GOLDEN
    enh = TESTDATA / "dcm_qa_philips_enh" / "enh_1901_WIP_3DpCASL_real" / "In"
    _, _, meta = read_series(sorted(enh.iterdir()))
    assert meta["enhanced"] and meta["rescale_slope"] == pytest.approx(0.1)
    assert meta["manufacturer"] == "Philips" and meta["tr"] == 4250.0 and meta["te"] == 9.0
    assert meta["philips_scale_slope"] == 10.0
    mos = TESTDATA / "dcm_qa_nih" / "Si_mr_0003" / "In"
    vol, _, meta = read_series(sorted(mos.iterdir()))
    assert meta["mosaic"] and meta["n_volumes"] == 2 and vol.shape == (2, 5, 72, 72)


@pytest.mark.skipif(not GOLDEN, reason="shared test data not found")
def test_csa_parser_agrees_with_nibabel():
    f = TESTDATA / "dcm_qa_ts" / "1_ExplicitVRLittleEndian" / "In" / "1.dcm"
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    ours = siemens_csa_image_header(ds)
    assert ours["NumberOfImagesInMosaic"] == ["35"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader
        theirs = csareader.get_csa_header(ds, "image")
    assert set(ours) == set(theirs["tags"])
    snv = [float(x) for x in ours["SliceNormalVector"]]
    np.testing.assert_allclose(snv, theirs["tags"]["SliceNormalVector"]["items"])
    with pytest.raises(ValueError):
        parse_csa_header(b"not a csa header")
    with pytest.raises(ValueError):
        parse_csa_header(csa2({"A": ["1"]})[:-6])


# ---------------------------------------------------------------- synthetic writers



# base orientations: columns = row cosine, column cosine, normal (LPS)
AXIAL = np.eye(3)
SAGITTAL = np.column_stack([[0, 1, 0], [0, 0, -1], np.cross([0, 1, 0], [0, 0, -1])]).astype(float)
CORONAL = np.column_stack([[1, 0, 0], [0, 0, -1], np.cross([1, 0, 0], [0, 0, -1])]).astype(float)


def make_affine(base=AXIAL, angles=(0.0, 0.0), spacing_zyx=(2.5, 1.1, 0.8),
                origin=(-40.0, -55.5, 12.25)) -> np.ndarray:
    r = rot(0, angles[0]) @ rot(1, angles[1]) @ base
    a = np.eye(4)
    a[:3, 2] = r[:, 0] * spacing_zyx[2]
    a[:3, 1] = r[:, 1] * spacing_zyx[1]
    a[:3, 0] = r[:, 2] * spacing_zyx[0]
    a[:3, 3] = origin
    return a


def base_dataset(sop_class=MR, ts=ExplicitVRLittleEndian, series_uid="1.2.826.0.1.3680043.8.498.1",
                 series_number=7, sop_uid=None, **kw) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-12345"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Secret Hospital"
    ds.StudyDate = "20240102"
    ds.Modality = "MR"
    ds.Manufacturer = kw.pop("manufacturer", "ACME")
    ds.ManufacturerModelName = "Model 1"
    ds.SeriesDescription = kw.pop("description", "t1_test")
    ds.ProtocolName = "t1_test"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.PatientPosition = kw.pop("patient_position", "HFS")
    ds.RepetitionTime = 500.0
    ds.EchoTime = 12.0
    ds.FlipAngle = 90.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ts = ds.file_meta.TransferSyntaxUID
    if ts == ExplicitVRBigEndian:
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=False)
    elif not ts.is_transfer_syntax:
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def write_classic(folder: Path, vol: np.ndarray, affine: np.ndarray, *, order=None, ts=ExplicitVRLittleEndian,
                  slope=None, intercept=None, acq=1, instance0=0, names="IM", skip=(), **kw) -> list[Path]:
    """One file per slice of vol[z, y, x] (int16 stored values) on `affine`; files in `order`."""
    folder.mkdir(parents=True, exist_ok=True)
    z = vol.shape[0]
    order = list(range(z)) if order is None else list(order)
    row = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    ps = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2]))]
    paths = []
    for inst, k in enumerate(order, start=1):
        if k in skip:
            continue
        ds = base_dataset(ts=ts, **kw)
        ds.InstanceNumber = instance0 + inst
        ds.AcquisitionNumber = acq
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[2]
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in np.concatenate([row, col])]
        ds.ImagePositionPatient = [f"{v:.8f}" for v in affine[:3, 3] + k * affine[:3, 0]]
        ds.PixelSpacing = [f"{v:.10f}" for v in ps]
        ds.SliceThickness = float(np.linalg.norm(affine[:3, 0]))
        ds.SpacingBetweenSlices = float(np.linalg.norm(affine[:3, 0]))
        if slope is not None:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept or 0
        sl = np.ascontiguousarray(vol[k].astype(np.int16))
        if ts == ExplicitVRBigEndian:
            ds.PixelData = sl.astype(">i2").tobytes()
        else:
            ds.PixelData = sl.astype("<i2").tobytes()
        ds["PixelData"].VR = "OW"
        if ts == RLELossless:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(RLELossless)
        paths.append(save(ds, folder / f"{names}{acq:02d}_{inst:04d}.dcm"))
    return paths


def volume(shape=(6, 10, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-300, 3000, size=shape).astype(np.int16)


def expected_ascending(vol, affine):
    """Reader convention: slices sorted along +normal."""
    normal = np.cross(affine[:3, 2], affine[:3, 1])
    if float(affine[:3, 0] @ normal) > 0:
        return vol, affine
    a = affine.copy()
    a[:3, 3] = affine[:3, 3] + (vol.shape[0] - 1) * affine[:3, 0]
    a[:3, 0] = -affine[:3, 0]
    return vol[::-1], a


def csa2(tags: dict[str, list[str]]) -> bytes:
    """A Siemens CSA2 header (see ingest.reader.parse_csa_header for the layout)."""
    out = b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, items in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(items), b"FD\0\0", 3, len(items), 77)
        for it in items:
            b = it.encode() + b"\0"
            out += struct.pack("<4i", len(b), len(b), 77, len(b)) + b + b"\0" * ((4 - len(b) % 4) % 4)
    return out


# ------------------------------------------------------- 1. classic single-frame

CASES = {
    "axial_HFS": (AXIAL, (0, 0), "HFS", 1),
    "sagittal_HFP": (SAGITTAL, (0, 0), "HFP", 1),
    "coronal_FFS": (CORONAL, (0, 0), "FFS", -1),
    "oblique_HFDL": (AXIAL, (17, 0), "HFDL", 1),
    "double_oblique_FFDR": (SAGITTAL, (12, -23), "FFDR", -1),
    "double_oblique_coronal_HFS": (CORONAL, (-8, 31), "HFS", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_classic_any_orientation_and_patient_position(tmp_path, case):
    base, angles, pp, sign = CASES[case]
    aff = make_affine(base, angles)
    aff[:3, 0] *= sign  # slices written descending along the normal for sign -1
    vol = volume()
    rng = np.random.default_rng(1)
    paths = write_classic(tmp_path / case, vol, aff, order=rng.permutation(vol.shape[0]), patient_position=pp)
    got, gaff, meta = read_series(paths)
    ev, ea = expected_ascending(vol, aff)
    np.testing.assert_array_equal(got, ev.astype(np.float32))
    np.testing.assert_allclose(gaff, ea, atol=1e-6)
    assert meta["patient_position"] == pp
    assert meta["n_slices"] == 6 and meta["rows"] == 10 and meta["columns"] == 12
    assert meta["pixel_spacing"] == pytest.approx([1.1, 0.8])


@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed")
def test_synthetic_double_oblique_matches_dcm2niix(tmp_path):
    aff = make_affine(SAGITTAL, (12, -23))
    aff[:3, 0] *= -1
    vol = volume((7, 10, 12), seed=3)
    paths = write_classic(tmp_path / "in", vol, aff, order=[3, 0, 6, 1, 5, 2, 4], patient_position="HFDR",
                          slope=0.5, intercept=-10)
    got, gaff, _ = read_series(paths)
    check_with_dcm2niix(got, gaff, tmp_path)
    np.testing.assert_allclose(got, expected_ascending(vol, aff)[0] * 0.5 - 10)


def test_single_slice_uses_spacing_along_normal(tmp_path):
    aff = make_affine(AXIAL, (10, 5))
    vol = volume((1, 8, 8))
    got, gaff, meta = read_series(write_classic(tmp_path / "s", vol, aff))
    assert got.shape == (1, 8, 8)
    np.testing.assert_allclose(gaff, aff, atol=1e-6)


def test_meta_has_no_identifying_fields(tmp_path):
    paths = write_classic(tmp_path / "s", volume((3, 8, 8)), make_affine(), slope=2.0, intercept=1.0)
    _, _, meta = read_series(paths)
    allowed = {"manufacturer", "model", "modality", "series_description", "protocol_name", "sequence_name",
               "image_type", "tr", "te", "ti", "flip_angle", "echo_numbers", "series_number",
               "transfer_syntax", "rows", "columns", "n_slices", "n_volumes", "pixel_spacing", "slice_thickness",
               "spacing_between_slices", "rescale_slope", "rescale_intercept", "rescale_type", "units",
               "patient_position", "mosaic", "enhanced", "n_files", "rescale_per_frame",
               "real_world_value_mapping", "philips_scale_slope"}
    assert set(meta) <= allowed
    text = repr(meta)
    for phi in ("Doe", "Jane", "PID-12345", "19700101", "Secret", "20240102", "1.2.826.0.1.3680043.8.498"):
        assert phi not in text
    assert meta["rescale_slope"] == 2.0 and meta["rescale_intercept"] == 1.0
    assert meta["tr"] == 500.0 and meta["te"] == 12.0 and meta["flip_angle"] == 90.0


# ------------------------------------------------------------ 2. enhanced multi-frame

def write_enhanced(path: Path, vols: np.ndarray, affine: np.ndarray, frame_order, slopes, *, tpi0=0,
                   series_uid="1.2.826.0.1.3680043.8.498.9", frame_types=None, echo_times=None) -> Path:
    """Enhanced MR with frames (t, z) in `frame_order`; per-frame rescale slope slopes[t, z];
    with `frame_types`, volume t's frames carry FrameType frame_types[t]."""
    ds = base_dataset(sop_class=ENHANCED_MR, series_uid=series_uid)
    t_n, z_n, rows, cols = vols.shape
    row = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = len(frame_order)
    ds.InstanceNumber = 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2]))]
    pm.SliceThickness = float(np.linalg.norm(affine[:3, 0]))
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [f"{v:.10f}" for v in np.concatenate([row, col])]
    shared.PlaneOrientationSequence = Sequence([po])
    timing = Dataset()
    timing.RepetitionTime = 2000.0
    timing.FlipAngle = 12.0
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    del ds.RepetitionTime, ds.FlipAngle, ds.EchoTime
    per, pix = [], []
    for t, z in frame_order:
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [f"{v:.8f}" for v in affine[:3, 3] + z * affine[:3, 0]]
        item.PlanePositionSequence = Sequence([pp])
        fc = Dataset()
        fc.TemporalPositionIndex = tpi0 + t + 1
        fc.InStackPositionNumber = z + 1
        item.FrameContentSequence = Sequence([fc])
        pvt = Dataset()
        pvt.RescaleSlope = f"{slopes[t, z]:g}"
        pvt.RescaleIntercept = "0"
        pvt.RescaleType = "US"
        item.PixelValueTransformationSequence = Sequence([pvt])
        echo = Dataset()
        echo.EffectiveEchoTime = 4.5 if echo_times is None else echo_times[t]
        item.MREchoSequence = Sequence([echo])
        if frame_types is not None:
            ft = Dataset()
            ft.FrameType = frame_types[t].split("\\")
            item.MRImageFrameTypeSequence = Sequence([ft])
        per.append(item)
        pix.append(vols[t, z])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.ascontiguousarray(np.stack(pix).astype("<i2")).tobytes()
    ds["PixelData"].VR = "OW"
    return save(ds, path)


def test_enhanced_multiframe_per_frame_geometry_and_rescale(tmp_path):
    aff = make_affine(CORONAL, (14, -9))
    aff[:3, 0] *= -1
    vols = np.stack([volume((5, 8, 9), seed=s) for s in (4, 5)])  # (T, Z, Y, X)
    rng = np.random.default_rng(2)
    order = [(t, z) for t in range(2) for z in range(5)]
    order = [order[i] for i in rng.permutation(len(order))]
    slopes = 0.25 + 0.25 * np.arange(10).reshape(2, 5)
    p = write_enhanced(tmp_path / "enh.dcm", vols, aff, order, slopes)
    got, gaff, meta = read_series([p])
    assert got.shape == (2, 5, 8, 9)
    ev, ea = expected_ascending(vols[0], aff)
    np.testing.assert_allclose(gaff, ea, atol=1e-6)
    for t in range(2):
        exp = (vols[t] * slopes[t][:, None, None])[::-1]  # descending written -> ascending read
        np.testing.assert_allclose(got[t], exp, rtol=1e-6)
    assert meta["enhanced"] and meta["n_volumes"] == 2 and meta["rescale_per_frame"]
    assert meta["tr"] == 2000.0 and meta["te"] == 4.5 and meta["flip_angle"] == 12.0


def test_enhanced_frames_of_two_kinds_are_not_stacked_as_volumes(tmp_path):
    """A Philips B0 map: magnitude and field-map frames in one file, same positions."""
    aff = make_affine(AXIAL, (5, 5))
    vols = np.stack([volume((4, 6, 7), seed=s) for s in (8, 9)])
    order = [(t, z) for t in range(2) for z in range(4)]
    slopes = np.ones((2, 4))
    kinds = ["ORIGINAL\\PRIMARY\\T1\\M", "ORIGINAL\\PRIMARY\\T1\\FIELD_MAP"]
    p = write_enhanced(tmp_path / "b0.dcm", vols, aff, order, slopes, frame_types=kinds)
    with pytest.raises(SeriesError) as err:
        read_series([p])
    msg = str(err.value)
    assert msg.startswith(str(p)) and "FIELD_MAP: 4 frame(s)" in msg and "\\M: 4 frame(s)" in msg
    for t, kind in enumerate(kinds):
        got, _gaff, meta = read_series([p], frame_type=kind)
        assert got.shape == (4, 6, 7) and meta["image_type"] == kind.split("\\")
        np.testing.assert_array_equal(got, vols[t])
    with pytest.raises(SeriesError, match="no frame has FrameType"):
        read_series([p], frame_type="ORIGINAL\\PRIMARY\\T1\\P")
    # grouped as dcm2niix writes them: one series per kind
    infos, _ = scan(tmp_path)
    groups, _ = group_series(infos)
    by_kind = {g.frame_type: g.key for g in groups}
    assert sorted(by_kind) == sorted(kinds)
    assert by_kind[kinds[0]].endswith("_M") and by_kind[kinds[1]].endswith("_FIELD_MAP")


def test_enhanced_series_of_several_files(tmp_path):
    aff = make_affine(AXIAL, (5, 5))
    vols = np.stack([volume((4, 6, 6), seed=s) for s in (6, 7, 8)])
    ones = np.ones((3, 4))
    # one file per volume (as XA fMRI exports), written out of order
    paths = [write_enhanced(tmp_path / f"v{t}.dcm", vols[t:t + 1], aff, [(0, z) for z in (2, 0, 3, 1)],
                            ones[t:t + 1], tpi0=t) for t in (2, 0, 1)]
    got, _, meta = read_series(paths)
    np.testing.assert_array_equal(got, vols.astype(np.float32))
    assert meta["n_files"] == 3 and meta["n_volumes"] == 3


# --------------------------------------------------------------- 3. transfer syntaxes

@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless,
                                DeflatedExplicitVRLittleEndian], ids=lambda u: u.name)
def test_transfer_syntaxes(tmp_path, ts):
    aff = make_affine(AXIAL, (3, 4))
    vol = volume((3, 8, 10), seed=9)
    paths = write_classic(tmp_path / "s", vol, aff, ts=ts)
    got, gaff, meta = read_series(paths)
    np.testing.assert_array_equal(got, vol.astype(np.float32))
    assert meta["transfer_syntax"] == str(ts)
    # and the scan that ingest runs first takes every file as an image (a deflated file was
    # once taken for one without pixel data: pydicom inflates it whole before reading)
    infos, problems = scan(tmp_path / "s")
    assert len(infos) == 3 and not problems


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2.4.100", "1.2.3.4.5.6.7"], ids=["MPEG2", "private"])
def test_unsupported_transfer_syntax(tmp_path, uid):
    from pydicom.encaps import encapsulate

    paths = write_classic(tmp_path / "s", volume((2, 8, 8)), make_affine())
    ds = pydicom.dcmread(paths[1])
    ds.file_meta.TransferSyntaxUID = uid
    if uid.startswith("1.2.840"):
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds["PixelData"].VR = "OB"
    save(ds, paths[1])
    pattern = rf"^{re.escape(str(paths[1]))}: transfer syntax .*{re.escape(uid)}.* not supported"
    with pytest.raises(SeriesError, match=pattern):
        read_series(paths)


# ------------------------------------------------------------------- 4. Siemens mosaic

def write_mosaic(path: Path, vol: np.ndarray, affine: np.ndarray, n_grid: int, *, acq=1, with_0019=True,
                 series_uid="1.2.826.0.1.3680043.8.498.77") -> Path:
    """Siemens mosaic of vol[z] (tiles in z order) on `affine` (slice k at origin + k * column 0)."""
    z, tr, tc = vol.shape
    rows, cols = tr * n_grid, tc * n_grid
    mosaic = np.zeros((rows, cols), np.int16)
    for k in range(z):
        r0, c0 = (k // n_grid) * tr, (k % n_grid) * tc
        mosaic[r0:r0 + tr, c0:c0 + tc] = vol[k]
    row = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    ps = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2]))]
    # IPP of a mosaic: the corner of the whole tiled image (inverse of the Siemens correction)
    ipp = affine[:3, 3] - row * ps[1] * (cols - tc) / 2 - col * ps[0] * (rows - tr) / 2
    snv = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    ds = base_dataset(manufacturer="SIEMENS", series_uid=series_uid,
                      ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"])
    ds.InstanceNumber = acq
    ds.AcquisitionNumber = acq
    ds.Rows, ds.Columns = rows, cols
    ds.ImageOrientationPatient = [f"{v:.10f}" for v in np.concatenate([row, col])]
    ds.ImagePositionPatient = [f"{v:.8f}" for v in ipp]
    ds.PixelSpacing = [f"{v:.10f}" for v in ps]
    ds.SliceThickness = float(np.linalg.norm(affine[:3, 0]))
    ds.SpacingBetweenSlices = float(np.linalg.norm(affine[:3, 0]))
    ds.ImagesInAcquisition = z
    if with_0019:
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", z)
    csa = csa2({"NumberOfImagesInMosaic": [str(z)],
                "SliceNormalVector": [f"{v:.8f}" for v in snv]})
    ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", csa)
    ds.PixelData = mosaic.astype("<i2").tobytes()
    ds["PixelData"].VR = "OW"
    return save(ds, path)


@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
@pytest.mark.parametrize("with_0019", [True, False], ids=["0019", "csa_only"])
def test_mosaic_detile_and_geometry(tmp_path, descending, with_0019):
    aff = make_affine(AXIAL, (-15, 8), spacing_zyx=(3.6, 2.0, 2.5))
    if descending:
        aff[:3, 0] *= -1
    vol = volume((7, 6, 8), seed=11)  # 7 tiles of 6 x 8 in a 3 x 3 grid
    p = write_mosaic(tmp_path / "m.dcm", vol, aff, 3, with_0019=with_0019)
    got, gaff, meta = read_series([p])
    ev, ea = expected_ascending(vol, aff)
    np.testing.assert_array_equal(got, ev.astype(np.float32))
    np.testing.assert_allclose(gaff, ea, atol=1e-5)
    assert meta["mosaic"] and meta["rows"] == 6 and meta["columns"] == 8 and meta["n_slices"] == 7


@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed")
def test_synthetic_descending_mosaic_matches_dcm2niix(tmp_path):
    aff = make_affine(AXIAL, (-15, 8), spacing_zyx=(3.6, 2.0, 2.5))
    aff[:3, 0] *= -1
    vols = [volume((7, 6, 8), seed=s) for s in (12, 13)]
    (tmp_path / "in").mkdir()
    paths = [write_mosaic(tmp_path / "in" / f"m{a}.dcm", v, aff, 3, acq=a) for a, v in zip((2, 1), vols)]
    got, gaff, meta = read_series(paths)
    assert got.shape == (2, 7, 6, 8)
    np.testing.assert_array_equal(got[0], expected_ascending(vols[1], aff)[0])  # acquisition 1 first
    check_with_dcm2niix(got, gaff, tmp_path)


def write_uih_grid(path: Path, vol: np.ndarray, affine: np.ndarray, *, acq=1, items=True,
                   series_uid="1.2.826.0.1.3680043.8.498.78") -> Path:
    """UIH grid of vol[z]: ceil(sqrt(z)) tiles a row, no top-level ImagePositionPatient, one
    (0065,1051) item per tile with that slice's position, slice count in (0065,1050)."""
    z, tr, tc = vol.shape
    n_col = int(np.ceil(np.sqrt(z)))
    n_row = int(np.ceil(z / n_col))
    grid = np.zeros((n_row * tr, n_col * tc), np.int16)
    for k in range(z):
        r0, c0 = (k // n_col) * tr, (k % n_col) * tc
        grid[r0:r0 + tr, c0:c0 + tc] = vol[k]
    row = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    ds = base_dataset(manufacturer="UIH", series_uid=series_uid, ImageType=["ORIGINAL", "PRIMARY", "M", "VFRAME"])
    ds.InstanceNumber = acq
    ds.AcquisitionNumber = acq
    ds.Rows, ds.Columns = grid.shape
    ds.ImageOrientationPatient = [f"{v:.10f}" for v in np.concatenate([row, col])]
    ds.PixelSpacing = [f"{float(np.linalg.norm(affine[:3, 1])):.10f}", f"{float(np.linalg.norm(affine[:3, 2])):.10f}"]
    ds.SliceThickness = float(np.linalg.norm(affine[:3, 0]))
    block = ds.private_block(0x0065, "Image Private Header", create=True)
    block.add_new(0x50, "DS", str(z))
    tiles = []
    for k in range(z):
        item = Dataset()
        item.ImagePositionPatient = [f"{v:.8f}" for v in affine[:3, 3] + k * affine[:3, 0]]
        tiles.append(item)
    if items:
        block.add_new(0x51, "SQ", Sequence(tiles))
    ds.PixelData = grid.astype("<i2").tobytes()
    ds["PixelData"].VR = "OW"
    return save(ds, path)


@pytest.mark.parametrize("z", [20, 7])
def test_uih_grid_detile_and_geometry_match_dcm2niix(tmp_path, z):
    """UIH grids: 20 slices are 4 rows of 5 tiles (not Siemens' 5 x 5); each tile is placed by
    its own position from the private sequence, here an oblique, descending stack."""
    aff = make_affine(AXIAL, (-12, 6), spacing_zyx=(4.2, 3.5, 3.5))
    aff[:3, 0] *= -1
    vols = [volume((z, 6, 8), seed=s) for s in (21, 22)]
    (tmp_path / "in").mkdir()
    paths = [write_uih_grid(tmp_path / "in" / f"g{a}.dcm", v, aff, acq=a) for a, v in zip((1, 2), vols)]
    got, gaff, meta = read_series(paths)
    assert got.shape == (2, z, 6, 8) and meta["mosaic"]
    ev, ea = expected_ascending(vols[0], aff)
    np.testing.assert_array_equal(got[0], ev)
    np.testing.assert_allclose(gaff, ea, atol=1e-6)
    check_with_dcm2niix(got, gaff, tmp_path)


def test_uih_grid_without_tile_positions_is_an_error(tmp_path):
    p = write_uih_grid(tmp_path / "g.dcm", volume((6, 4, 4)), make_affine(AXIAL), items=False)
    with pytest.raises(SeriesError, match=r"g\.dcm: UIH grid of 6 slices without one \(0065,1051\) item per slice"):
        read_series([p])


def test_mosaic_without_slice_normal_is_an_error(tmp_path):
    p = write_mosaic(tmp_path / "m.dcm", volume((4, 6, 6)), make_affine(), 2)
    ds = pydicom.dcmread(p)
    ds[0x0029, 0x1010].value = csa2({"NumberOfImagesInMosaic": ["4"]})
    save(ds, p)
    with pytest.raises(SeriesError, match="without a usable SliceNormalVector"):
        read_series([p])


def test_mosaic_without_count_is_an_error(tmp_path):
    p = write_mosaic(tmp_path / "m.dcm", volume((4, 6, 6)), make_affine(), 2, with_0019=False)
    ds = pydicom.dcmread(p)
    del ds[0x0029, 0x1010]
    save(ds, p)
    with pytest.raises(SeriesError, match="NumberOfImagesInMosaic"):
        read_series([p])


# ----------------------------------------------------------------- 5. multi-volume

def test_multivolume_in_acquisition_order(tmp_path):
    aff = make_affine(AXIAL, (0, 0))
    vols = [volume((4, 6, 7), seed=20 + t) for t in range(3)]
    paths = []
    for acq in (3, 1, 2):  # written out of order; file names do not follow time
        paths += write_classic(tmp_path / "s", vols[acq - 1], aff, acq=acq, order=[2, 0, 3, 1],
                               names=f"X{4 - acq}_")
    got, gaff, meta = read_series(paths)
    assert got.shape == (3, 4, 6, 7) and meta["n_volumes"] == 3
    np.testing.assert_array_equal(got, np.stack(vols).astype(np.float32))
    np.testing.assert_array_equal(read_series(tmp_path / "s")[0], got)  # a folder works too


def test_multivolume_ordered_by_instance_number_when_acquisition_number_is_constant(tmp_path):
    aff = make_affine(AXIAL, (0, 0))
    vols = [volume((3, 5, 5), seed=30 + t) for t in range(2)]
    paths = []
    for t in (1, 0):  # GE style: AcquisitionNumber 1 everywhere, InstanceNumber runs on
        paths += write_classic(tmp_path / "s", vols[t], aff, acq=1, instance0=10 * t, names=f"v{1 - t}_")
    got, _, _ = read_series(paths)
    np.testing.assert_array_equal(got, np.stack(vols).astype(np.float32))


def test_multivolume_across_midnight_keeps_acquisition_order(tmp_path):
    """Volumes told apart only by acquisition time (GE: AcquisitionNumber 1 throughout, and
    instance numbers that do not follow time here): a series running past midnight orders by
    date and time, not by a time of day that starts again at 0."""
    aff = make_affine(AXIAL, (0, 0))
    vols = [volume((3, 5, 5), seed=40 + t) for t in range(2)]
    paths = []
    for t, (date, time) in enumerate((("20240101", "235958.5"), ("20240102", "000002"))):
        paths += write_classic(tmp_path / "s", vols[t], aff, acq=1, instance0=10 * (1 - t), names=f"v{t}_",
                               AcquisitionDate=date, AcquisitionTime=time)
    for fast in ("1", "0"):
        os.environ["QSNET_DICOM_FASTPATH"] = fast
        try:
            got, _, _ = read_series(paths)
        finally:
            os.environ.pop("QSNET_DICOM_FASTPATH")
        np.testing.assert_array_equal(got, np.stack(vols).astype(np.float32))


def test_echoes_without_echo_numbers_are_split_by_echo_time(tmp_path):
    """EchoNumbers is optional: two echoes at each position, told apart only by EchoTime, are two
    series as dcm2niix makes them, not two volumes of one."""
    aff = make_affine(AXIAL, (0, 0))
    vols = [volume((3, 5, 5), seed=50 + e) for e in range(2)]
    for e, te in enumerate((10.0, 5.0)):
        write_classic(tmp_path / "s", vols[e], aff, instance0=3 * e, names=f"e{e}_", EchoTime=te)
    infos, _ = scan(tmp_path / "s")
    groups, _ = group_series(infos)
    assert [(g.key.rsplit("_", 1)[-1], g.te, len(g.files)) for g in groups] == [("e1", 5.0, 3), ("e2", 10.0, 3)]
    for g, vol in zip(groups, (vols[1], vols[0])):
        got, _, meta = read_series(g.files)
        np.testing.assert_array_equal(got, vol.astype(np.float32))
    # one echo time throughout: one series, whatever else differs
    same = group_series([FileInfo(**{**vars(i), "te": 5.0}) for i in infos])[0]
    assert len(same) == 1


def test_echoes_are_never_stacked_as_volumes(tmp_path):
    """An enhanced object holding two echoes (TE per frame), or classic files of two echoes given to
    read_series together, would pass as a 4-D time series whose TE is the first echo's."""
    aff = make_affine(AXIAL, (0, 0))
    vols = np.stack([volume((3, 5, 5), seed=60 + e) for e in range(2)])
    enh = write_enhanced(tmp_path / "enh.dcm", vols, aff, [(t, z) for z in range(3) for t in range(2)],
                         np.ones((2, 3)), echo_times=(5.0, 15.0))
    with pytest.raises(SeriesError, match=r"holds images of 2 echoes \(TE 5, TE 15; .*one series per echo"):
        read_series([enh])
    # one echo time written with different last digits is one echo
    same = write_enhanced(tmp_path / "same.dcm", vols, aff, [(t, z) for z in range(3) for t in range(2)],
                          np.ones((2, 3)), echo_times=(4.5, 4.5000001))
    assert read_series([same])[0].shape == (2, 3, 5, 5)
    paths = []
    for e in range(2):
        paths += write_classic(tmp_path / "s", vols[e], aff, instance0=3 * e, names=f"e{e}_", EchoNumbers=e + 1,
                               EchoTime=5.0 + 10 * e)
    with pytest.raises(SeriesError, match=r"holds images of 2 echoes \(echo 1, echo 2; "):
        read_series(paths)
    assert read_series(paths[:3])[0].shape == (3, 5, 5)


def test_multivolume_with_incomplete_volume(tmp_path):
    aff = make_affine(AXIAL, (0, 0))
    paths = write_classic(tmp_path / "s", volume((4, 5, 5)), aff, acq=1)
    paths += write_classic(tmp_path / "s", volume((4, 5, 5)), aff, acq=2, skip=(2,))
    with pytest.raises(SeriesError, match="has 1 images but the other positions have 2.*incomplete"):
        read_series(paths)


# ------------------------------------------------------------------- 6. errors

def test_missing_slice_names_the_position(tmp_path):
    aff = make_affine(AXIAL, (0, 0), spacing_zyx=(5.0, 1.0, 1.0), origin=(0.0, 0.0, 10.0))
    paths = write_classic(tmp_path / "s", volume((6, 5, 5)), aff, skip=(3,))
    with pytest.raises(SeriesError) as exc:
        read_series(paths)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 's'}: missing slice") and "(0.00, 0.00, 25.00) mm" in msg
    assert "\n" not in msg


def test_duplicated_slice_position(tmp_path):
    aff = make_affine(AXIAL, (0, 0))
    paths = write_classic(tmp_path / "s", volume((4, 5, 5)), aff)
    paths += write_classic(tmp_path / "s", volume((4, 5, 5), seed=5), aff, order=[1], names="DUP")
    with pytest.raises(SeriesError, match="duplicated slice position"):
        read_series(paths)


def test_a_second_copy_of_a_series_is_not_a_second_volume(tmp_path):
    """A re-stored copy (new SOPInstanceUIDs, everything else equal) must not be read as a 4-D
    series of two identical volumes."""
    aff = make_affine(AXIAL, (0, 0))
    paths = write_classic(tmp_path / "s", volume((3, 5, 5)), aff)
    paths += write_classic(tmp_path / "s", volume((3, 5, 5)), aff, names="COPY")
    with pytest.raises(SeriesError, match="duplicated image: .* same TemporalPositionIdentifier.* same pixels"):
        read_series(paths)
    # different pixels, nothing to order them by: refused, not stacked in file-name order
    other = write_classic(tmp_path / "t", volume((3, 5, 5)), aff)
    other += write_classic(tmp_path / "t", volume((3, 5, 5), seed=9), aff, names="B")
    with pytest.raises(SeriesError, match="images at one position cannot be put in order"):
        read_series(other)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_pixel_data_holding_whole_extra_frames_is_refused(tmp_path, monkeypatch, fast):
    """Rows edited, or NumberOfFrames dropped by an anonymiser: the first frame alone would be a
    silently wrong image. Both readers (the fast one and pydicom) refuse it."""
    monkeypatch.setenv("QSNET_DICOM_FASTPATH", fast)
    paths = write_classic(tmp_path / "s", volume((3, 8, 8)), make_affine())
    ds = pydicom.dcmread(paths[1])
    ds.Rows = 4
    save(ds, paths[1])
    with pytest.raises(SeriesError, match=rf"^{re.escape(str(paths[1]))}: 128 bytes of pixel data, 2 times the 64 "
                                          "that Rows x Columns \\(4 x 8\\).*header and pixel data disagree"):
        read_series(paths)


@pytest.mark.parametrize("meta", [False, True])
def test_a_dicm_file_without_a_transfer_syntax_is_read_as_encoded(tmp_path, meta):
    """Preamble and 'DICM', then no meta group, or one without TransferSyntaxUID: the data set's
    own encoding (explicit VR little endian here) is the syntax, not implicit VR."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    vol = volume((2, 5, 5))
    src = write_classic(tmp_path / "src", vol, make_affine())
    out = []
    for i, p in enumerate(src):
        ds = pydicom.dcmread(p)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\0" * 128 + b"DICM")
        if meta:
            m = Dataset()
            m.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPClassUID
            m.MediaStorageSOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            write_dataset(fp, m)
        write_dataset(fp, ds)
        out.append(tmp_path / f"{i}.dcm")
        out[-1].write_bytes(fp.getvalue())
    arr, _, info = read_series(out)
    assert np.array_equal(arr, read_series(src)[0])
    assert info["transfer_syntax"] == read_series(src)[2]["transfer_syntax"]


def test_a_value_of_an_unknown_vr_is_a_series_error(tmp_path):
    paths = write_classic(tmp_path / "s", volume((3, 5, 5)), make_affine())
    data = bytearray(paths[1].read_bytes())
    i = data.find(b"\x20\x00\x32\x00DS")   # (0020,0032) ImagePositionPatient, explicit VR
    assert i > 0
    data[i + 4:i + 6] = b"ES"
    paths[1].write_bytes(bytes(data))
    with pytest.raises(SeriesError, match=rf"^{re.escape(str(paths[1]))}: unreadable DICOM header"):
        read_series(paths)


def test_uneven_spacing(tmp_path):
    aff = make_affine(AXIAL, (0, 0), spacing_zyx=(5.0, 1.0, 1.0))
    paths = write_classic(tmp_path / "s", volume((5, 5, 5)), aff)
    ds = pydicom.dcmread(paths[2])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 1.5]
    save(ds, paths[2])
    # the steps are 5, 6.5, 3.5, 5 mm: the message gives the median, not an "elsewhere" no step has
    with pytest.raises(SeriesError, match="unevenly spaced slices: step 6.5 mm .* median step of 5 mm"):
        read_series(paths)


def test_a_one_value_pixel_spacing_is_named_plainly(tmp_path):
    paths = write_classic(tmp_path / "s", volume((3, 5, 5)), make_affine())
    ds = pydicom.dcmread(paths[1])
    ds.PixelSpacing = "0.5"
    save(ds, paths[1])
    with pytest.raises(SeriesError) as exc:
        read_series(paths)
    assert str(exc.value).startswith(f"{paths[1]}: PixelSpacing must hold 2 numbers, got [")


def test_a_volume_mixing_temporal_positions_names_the_odd_file(tmp_path):
    aff = make_affine(AXIAL, (0, 0))
    paths = []
    for acq in (1, 2):
        paths += write_classic(tmp_path / "s", volume((4, 5, 5), seed=acq), aff, acq=acq)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.TemporalPositionIdentifier = 3 if p == paths[6] else int(ds.AcquisitionNumber)
        save(ds, p)
    with pytest.raises(SeriesError, match=rf"would mix temporal positions \[2, 3\].*{paths[6].name} is at temporal position 3"):
        read_series(paths)


def test_no_pixel_data(tmp_path):
    paths = write_classic(tmp_path / "s", volume((3, 5, 5)), make_affine())
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    save(ds, paths[0])
    with pytest.raises(SeriesError, match=rf"^{re.escape(str(paths[0]))}: no pixel data"):
        read_series(paths)


def test_truncated_pixel_data(tmp_path):
    paths = write_classic(tmp_path / "s", volume((3, 16, 16)), make_affine())
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-100])
    with pytest.raises(SeriesError, match=rf"^{re.escape(str(paths[1]))}: pixel data truncated"):
        read_series(paths)


def test_a_full_size_file_with_a_damaged_length_is_not_called_only_a_short_copy(tmp_path):
    """One element length damaged in the header makes the header read run to the end of a
    complete file: the reason must not send a person only after an incomplete copy."""
    from ingest.series import scan

    paths = write_classic(tmp_path / "s", volume((3, 16, 16)), make_affine())
    size = paths[1].stat().st_size
    data = bytearray(paths[1].read_bytes())
    i = data.index(b"\x08\x00\x3e\x10LO")  # SeriesDescription: a 2-byte length in explicit VR
    data[i + 6:i + 8] = struct.pack("<H", 0xFFFF)
    paths[1].write_bytes(bytes(data))
    # still the whole file (its own size: the slices' random UIDs make their sizes differ)
    assert paths[1].stat().st_size == size
    infos, problems = scan(tmp_path / "s")
    assert len(infos) == 2  # the series, found once (through "again", first in name order)
    ((path, why),) = problems
    assert path == paths[1] and "damaged in the header" in why and "incomplete copy" in why, why


def test_pixel_data_shorter_than_header_says(tmp_path):
    paths = write_classic(tmp_path / "s", volume((3, 16, 16)), make_affine())
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:400]  # element and file consistent, header wants 512 bytes
    save(ds, paths[1])
    with pytest.raises(SeriesError, match=rf"^{re.escape(str(paths[1]))}: pixel data shorter than Rows x Columns"):
        read_series(paths)


def test_rows_columns_far_larger_than_pixel_data(tmp_path):
    paths = write_classic(tmp_path / "s", volume((3, 8, 8)), make_affine())
    ds = pydicom.dcmread(paths[2])
    ds.Rows, ds.Columns = 4096, 4096
    save(ds, paths[2])
    with pytest.raises(SeriesError, match=r"Rows x Columns \(4096 x 4096\).*far more than the 128 bytes"):
        read_series(paths)


def test_inconsistent_dimensions(tmp_path):
    aff = make_affine()
    paths = write_classic(tmp_path / "s", volume((3, 8, 8)), aff)
    big = volume((3, 8, 10))
    paths += write_classic(tmp_path / "t", big, aff + np.c_[np.zeros((4, 3)), [0, 0, 3 * aff[2, 0], 0]],
                           names="B")
    with pytest.raises(SeriesError, match="inconsistent dimensions"):
        read_series(paths)


def test_orientation_differs(tmp_path):
    paths = write_classic(tmp_path / "a", volume((3, 8, 8)), make_affine(AXIAL))
    paths += write_classic(tmp_path / "b", volume((3, 8, 8)), make_affine(SAGITTAL), names="S")
    with pytest.raises(SeriesError, match="orientation .* differs"):
        read_series(paths)


def test_not_dicom_and_no_files(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SeriesError, match="x.txt: not a DICOM file"):
        read_series([tmp_path / "x.txt"])
    with pytest.raises(SeriesError, match="no files"):
        read_series([])


# -------------------------------------------------------------------------- scan

def test_scan_link_reasons_name_no_path_above_the_tree(tmp_path):
    # The folders above SRC (a mount named after a patient, a user's home) never reach a reason;
    # paths inside it are named as the manifest's rows name them.
    above = tmp_path / "DOE_JOHN_1961"
    root = above / "tree"
    exam = root / "exam"
    write_classic(exam / "s1", volume((2, 8, 8)), make_affine())
    (exam / "deep" / "s2").mkdir(parents=True)
    os.symlink(above / "gone.dcm", exam / "outside.dcm")
    os.symlink(exam / "missing.dcm", exam / "inside.dcm")
    os.symlink(root / "..hidden" / "x.dcm", exam / "dotted.dcm")     # "..hidden" is inside SRC
    os.symlink("self.dcm", exam / "self.dcm")                         # ELOOP, not a missing target
    os.symlink("deep/s2", exam / "again")                            # linked after s1, s2 are walked
    os.symlink("../m.dcm", exam / "deep" / "s2" / "up.dcm")           # resolves from deep/, not exam/
    os.symlink(exam / "s1", exam / "a_link")                         # named before s1, walked after it
    os.symlink(exam, exam / "s1" / "loop")
    infos, problems = scan(root)
    reasons = {str(p.relative_to(root)): r for p, r in problems}
    assert reasons == {
        "exam/outside.dcm": "broken symlink: its target a path outside the input tree does not exist",
        "exam/inside.dcm": "broken symlink: its target exam/missing.dcm does not exist",
        "exam/dotted.dcm": "broken symlink: its target ..hidden/x.dcm does not exist",
        "exam/self.dcm": "broken symlink: Too many levels of symbolic links",
        "exam/deep/s2/up.dcm": "broken symlink: its target exam/deep/m.dcm does not exist",
        "exam/a_link": "link to a folder already scanned as exam/s1; not followed twice",
        "exam/again": "link to a folder already scanned as exam/deep/s2; not followed twice",
        "exam/s1/loop": "symlink loop: points back to its ancestor exam; not followed",
    }
    assert sorted(str(i.path.relative_to(root)) for i in infos) == ["exam/s1/IM01_0001.dcm", "exam/s1/IM01_0002.dcm"]


def test_scan_tree_with_bad_files_and_symlink_loop(tmp_path):
    root = tmp_path / "tree"
    good = write_classic(root / "exam" / "s1", volume((2, 8, 8)), make_affine())
    (root / "exam" / "empty.dcm").write_bytes(b"")
    (root / "exam" / "notes.txt").write_text("not dicom\n")
    hdr = good[0].read_bytes()
    (root / "exam" / "trunc.dcm").write_bytes(hdr[:400])          # cut inside the header
    (root / "exam" / "cutpix.dcm").write_bytes(hdr[:-40])         # cut inside the pixel data
    os.symlink(root / "exam", root / "exam" / "s1" / "loop")       # points back to an ancestor
    ds = pydicom.dcmread(good[1])
    ds.Rows = ds.Columns = 4096
    save(ds, root / "exam" / "huge.dcm")
    infos, problems = scan(root)
    assert sorted(i.path for i in infos) == sorted(good)
    reasons = {p.name: r for p, r in problems}
    assert set(reasons) == {"empty.dcm", "notes.txt", "trunc.dcm", "cutpix.dcm", "loop", "huge.dcm"}
    assert "far more than" in reasons["huge.dcm"]
    assert all("\n" not in r for r in reasons.values())
    assert reasons["empty.dcm"].startswith("empty file")
    assert reasons["notes.txt"].startswith("not DICOM")
    assert "truncated" in reasons["trunc.dcm"]
    assert reasons["cutpix.dcm"].startswith("pixel data truncated")
    assert reasons["loop"] == "symlink loop: points back to its ancestor exam; not followed"
    i0 = next(i for i in infos if i.path == good[0])
    assert i0.rows == 8 and i0.columns == 8 and i0.series_number == 7 and i0.n_frames == 1
    assert i0.orientation == pytest.approx((1, 0, 0, 0, 1, 0)) and i0.transfer_syntax == ExplicitVRLittleEndian
    assert not hasattr(i0, "patient_name")


def test_scan_then_group_then_read(tmp_path):
    root = tmp_path / "tree"
    write_classic(root / "a", volume((3, 8, 8)), make_affine(AXIAL), series_uid="1.2.3.4", series_number=3)
    write_classic(root / "a", volume((4, 8, 8)), make_affine(SAGITTAL), series_uid="1.2.3.4", series_number=3,
                  names="SAG")
    infos, problems = scan(root)
    assert not problems
    groups, dups = group_series(infos)
    assert [len(g.files) for g in groups] == [3, 4] and not dups
    assert [g.key for g in groups] == ["3_1.2.3.4_part1", "3_1.2.3.4_part2"]
    for g in groups:
        vol, _, meta = read_series(g.files)
        assert vol.shape[0] == len(g.files)
        assert g.description == "t1_test" and g.tr == 500.0 and g.manufacturer == "ACME"


# ------------------------------------------------------------------ group_series

def fi(name, sop, uid="1.2.3", number=5, iop=(1, 0, 0, 0, 1, 0), rows=8, echo=None, itype=("ORIGINAL",)):
    return FileInfo(path=Path("/x") / name, size=100, sop_instance_uid=sop, sop_class_uid=MR, series_uid=uid,
                    series_number=number, study_uid="1.2", echo_number=echo, orientation=tuple(map(float, iop)),
                    position=(0.0, 0.0, 0.0), pixel_spacing=(1.0, 1.0), rows=rows, columns=rows,
                    image_type=tuple(itype), description="d")


def test_group_series_splits_orientations_and_reports_duplicates():
    files = [fi("a1", "1.1"), fi("a2", "1.2"), fi("s1", "1.3", iop=(0, 1, 0, 0, 0, -1)),
             fi("s2", "1.4", iop=(0, 1, 0, 0, 0, -1)), fi("zdup", "1.2"),
             fi("a3", "1.5", iop=(1, 0, 0, 0, 1, 1e-5))]  # within tolerance: same stack
    groups, problems = group_series(files)
    assert [(g.key, [p.name for p in g.files]) for g in groups] == [
        ("5_1.2.3_part1", ["a1", "a2", "a3"]), ("5_1.2.3_part2", ["s1", "s2"])]
    assert problems == [(Path("/x/zdup"), "duplicate SOP instance 1.2 of /x/a2")]


def test_group_series_by_uid_and_number_echo_and_matrix():
    files = [fi("e1", "2.1", echo=1), fi("e2", "2.2", echo=2), fi("e1b", "2.3", echo=1),
             fi("n6", "2.4", number=6), fi("m16", "2.5", rows=16, echo=2), fi("other", "2.6", uid="9.9")]
    groups, problems = group_series(files)
    keys = {g.key: sorted(p.name for p in g.files) for g in groups}
    assert keys == {"5_1.2.3_e1": ["e1", "e1b"], "5_1.2.3_e2_part1": ["e2"], "5_1.2.3_e2_part2": ["m16"],
                    "6_1.2.3": ["n6"], "5_9.9": ["other"]}
    assert not problems


def test_a_tilted_stack_goes_to_nifti_without_a_disagreeing_qform(tmp_path):
    """A qform cannot hold a shear: written with one, the file's qform and sform disagreed by
    millimetres, and a reader that prefers the qform put the voxels there."""
    import nibabel as nib

    from ingest.nifti import load_nifti_zyx, save_nifti

    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    tilted = np.array([[3.0, 0, 0, 30], [0.8, 0.8, 0, 10], [0, 0, 0.5, -20], [0, 0, 0, 1]])
    square = tilted.copy()
    square[1, 0] = 0.0
    for aff, qcode in ((tilted, 0), (square, 1)):
        save_nifti(tmp_path / "v.nii.gz", vol, aff)
        hdr = nib.load(str(tmp_path / "v.nii.gz")).header
        assert int(hdr["qform_code"]) == qcode and int(hdr["sform_code"]) == 1
        back, back_aff = load_nifti_zyx(tmp_path / "v.nii.gz")
        np.testing.assert_allclose(back_aff, aff, atol=1e-4)
        assert np.array_equal(back, vol)
        if qcode:
            np.testing.assert_allclose(hdr.get_qform(), hdr.get_sform(), atol=1e-4)


@pytest.mark.parametrize("case", ["u1", "i2", "f4", "f8", "uncompressed", "tilted", "scaled", "qform only",
                                  "4-D", "big endian", "no sform code"])
def test_nifti_fast_path_reads_as_nibabel_or_leaves_it_to_nibabel(tmp_path, case):
    """load_nifti_zyx reads a plain NIfTI (3-D, little endian, placed by its sform, unscaled)
    itself, and anything else through nibabel: the same arrays and affines either way."""
    import nibabel as nib

    from ingest.nifti import _plain_nifti, load_nifti_zyx, save_nifti

    dtype = case if case in ("u1", "i2", "f4", "f8") else "i2"
    vol = (np.arange(4 * 5 * 6) % 97).reshape(4, 5, 6).astype(dtype)
    aff = np.array([[0, 0, 1.2, -30], [0, -1.1, 0, 40], [-3.0, 0, 0, 12], [0, 0, 0, 1]])
    if case == "tilted":
        aff[1, 0] = 0.7
    p = tmp_path / "v.nii.gz"
    save_nifti(p, vol, aff)
    img = nib.load(str(p))
    if case == "uncompressed":
        p = tmp_path / "v.nii"
        nib.save(img, str(p))
    if case in ("scaled", "no sform code"):  # nibabel rewrites both on save: edit the bytes
        p = tmp_path / "v.nii"
        nib.save(img, str(p))
        raw = bytearray(p.read_bytes())
        if case == "scaled":
            struct.pack_into("<2f", raw, 112, 2.0, -1.0)
        else:
            struct.pack_into("<h", raw, 254, 0)
        p.write_bytes(bytes(raw))
    elif case == "qform only":
        img.header.set_sform(None, code=0)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, img.header), str(p))
    elif case == "4-D":
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None].repeat(2, -1), img.affine, img.header), str(p))
    elif case == "big endian":
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header.as_byteswapped(">")), str(p))
    taken = _plain_nifti(p) is not None
    assert taken == (case in ("u1", "i2", "f4", "f8", "uncompressed", "tilted")), case
    if case == "4-D":
        return  # load_nifti_zyx reads volumes; serve refuses a 4-D map by name before it
    ref = nib.load(str(p))
    ref_data = np.ascontiguousarray(np.asarray(ref.dataobj).transpose(2, 1, 0))
    data, affine = load_nifti_zyx(p)
    assert data.dtype == ref_data.dtype and np.array_equal(data, ref_data) and data.flags.writeable
    assert np.array_equal(affine, np.diag([-1.0, -1, 1, 1]) @ ref.affine[:, [2, 1, 0, 3]])


# ------------------------------------------------- pydicom's own test files: a wider sample of writers

PYDICOM_FILES = sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))


def _pydicom_reference(path: Path):
    """pydicom's decoded, rescaled pixels, or None where pydicom cannot decode the file."""
    from pydicom.pixels import apply_rescale

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
            return ds, apply_rescale(ds.pixel_array.astype(np.float64), ds)
        except Exception:  # noqa: BLE001 - whatever pydicom cannot decode is not a reference
            return ds if "ds" in locals() else None, None


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=lambda p: p.name)
def test_pydicom_sample_reads_equal_or_fails_clearly(path):
    """Every file pydicom ships: read_series gives pydicom's values or a SeriesError naming the
    file. An AttributeError or KeyError here is a header the reader trusted without checking."""
    ds, ref = _pydicom_reference(path)
    try:
        arr, _aff, _meta = read_series([path])
    except SeriesError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    assert ref is not None, f"{path.name}: read although pydicom cannot decode it"
    assert arr.size == ref.size
    np.testing.assert_allclose(np.asarray(arr, np.float64).ravel(), ref.ravel(), atol=1e-3)


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=lambda p: p.name)
def test_pydicom_sample_scan_reason_is_true(path):
    """The scan's reason for a file must not blame truncation when pydicom decodes all its pixels."""
    _ds, ref = _pydicom_reference(path)
    infos, problems = scan(path)
    if ref is not None:
        for _p, reason in problems:
            assert "truncated" not in reason and "disagree" not in reason, f"{path.name}: {reason}"


@pytest.mark.parametrize("text,expected", [
    ("20240131235959", "2024-01-31 23:59:59"),
    ("20240131235959.25", "2024-01-31 23:59:59.25"),
    ("20240131235959+0100", "2024-01-31 23:59:59"),   # offsets are dropped: the order within one exam
    ("20241301000000", None),                           # month 13
    ("2024013123595x", None),
    ("20240131 35959", None),
    ("", None),
])
def test_acquisition_datetime_for_ordering(text, expected):
    from datetime import datetime

    from ingest.reader import _dt_seconds

    got = _dt_seconds(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(datetime.fromisoformat(expected).timestamp())


def _ge_complex_series(folder: Path, ts=ExplicitVRLittleEndian, components=(0, 1)
                       ) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """A GE series as the scanner writes complex output: magnitude and phase (or another of
    ``components``: 0 to 3 for magnitude, phase, real, imaginary) images under one
    SeriesInstanceUID and one ImageType, told apart only by the private image type (0043,xx2F)."""
    aff = make_affine(AXIAL, (4, -3))
    mag, pha = volume((5, 6, 7), seed=21), volume((5, 6, 7), seed=22)
    paths = []
    for comp, (vol, inst0) in zip(components, ((mag, 0), (pha, 5))):
        for p in write_classic(folder, vol, aff, ts=ts, instance0=inst0, names=f"C{comp}_",
                               manufacturer="GE MEDICAL SYSTEMS", ImageType=["ORIGINAL", "PRIMARY", "OTHER"]):
            ds = pydicom.dcmread(p)
            ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", comp)
            save(ds, p)
            paths.append(p)
    return paths, mag, pha


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_ge_magnitude_and_phase_of_one_series_are_two_volumes(tmp_path, monkeypatch, ts):
    paths, mag, pha = _ge_complex_series(tmp_path / "swan", ts)
    with pytest.raises(SeriesError, match=r"2 complex components \(MAGNITUDE .*PHASE"):
        read_series(paths)
    infos, problems = scan(tmp_path / "swan")
    assert not problems
    groups, _ = group_series(infos)
    assert sorted(g.complex_component for g in groups) == ["MAGNITUDE", "PHASE"]
    for g in groups:
        vol, _, meta = read_series(g.files, infos=infos)
        np.testing.assert_array_equal(vol, mag if g.complex_component == "MAGNITUDE" else pha)
        assert meta["complex_component"] == g.complex_component
    # the fast header parser and pydicom agree on the private element
    monkeypatch.setenv("QSNET_DICOM_FASTPATH", "0")
    slow, _ = scan(tmp_path / "swan")
    assert [i.complex_component for i in slow] == [i.complex_component for i in infos]
    assert all(i.plan is not None for i in infos) and all(i.plan is None for i in slow)


def test_complex_component_from_image_type_and_attribute(tmp_path):
    from ingest.reader import complex_component

    ds = base_dataset(ImageType=["ORIGINAL", "PRIMARY", "P", "ND"])
    assert complex_component(ds) == "PHASE"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    assert complex_component(ds) == "MAGNITUDE"
    ds.ComplexImageComponent = "REAL"
    assert complex_component(ds) == "REAL"
    ds = base_dataset(ImageType=["DERIVED", "PRIMARY", "T1 MAP", "ND"])
    assert complex_component(ds) == ""
    # a GE value outside 0..3, or the element under another creator, says nothing
    ds = base_dataset(manufacturer="GE MEDICAL SYSTEMS", ImageType=["ORIGINAL", "PRIMARY", "OTHER"])
    ds.private_block(0x0043, "OTHER_CREATOR", create=True).add_new(0x2F, "SS", 1)
    assert complex_component(ds) == ""
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", 7)
    assert complex_component(ds) == ""


@pytest.mark.parametrize("zip_factor", [1, 2])
def test_ge_b0_map_is_a_field_map_and_a_magnitude_volume(tmp_path, zip_factor):
    """GE's B0 map: one series, one ImageType, one private image type (magnitude) for both
    volumes; the first LocationsInAcquisition instances (acquired locations: times the ZIP
    factor when slices were interpolated) are the field map in Hz. dcm2niix writes them as two
    files (``_fieldmaphz``); so does the reader, never one 4-D stack."""
    aff = make_affine(AXIAL, (0, 6))
    hz, mag = volume((4, 6, 7), seed=31), volume((4, 6, 7), seed=32)
    paths = []
    for vol, inst0, names in ((hz, 0, "A_"), (mag, 4, "B_")):
        for p in write_classic(tmp_path / "b0", vol, aff, instance0=inst0, names=names,
                               manufacturer="GE MEDICAL SYSTEMS", ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
                               ImagesInAcquisition=8):
            ds = pydicom.dcmread(p)
            ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0x9E, "LO", "B0map")
            ds.private_block(0x0021, "GEMS_RELA_01", create=True).add_new(0x4F, "SS", 4 // zip_factor)
            ds.SliceThickness = ds.SpacingBetweenSlices * zip_factor
            ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", 0)
            save(ds, p)
            paths.append(p)
    with pytest.raises(SeriesError, match=r"FIELD_MAP .*MAGNITUDE"):
        read_series(paths)
    infos, _ = scan(tmp_path / "b0")
    groups, _ = group_series(infos)
    assert sorted(g.complex_component for g in groups) == ["FIELD_MAP", "MAGNITUDE"]
    for g in groups:
        vol, _, _ = read_series(g.files, infos=infos)
        np.testing.assert_array_equal(vol, hz if g.complex_component == "FIELD_MAP" else mag)
    # without the B0 map's pulse sequence name the same instances are one magnitude series
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds[0x0019109E]
        save(ds, p)
    infos, _ = scan(tmp_path / "b0")
    assert {i.complex_component for i in infos} == {"MAGNITUDE"}


@pytest.mark.parametrize("mode, reversed_volumes", [(0, ()), (1, (1, 2)), (2, (1,)), (3, (2,))])
def test_ge_pepolar_reversed_volumes_are_flipped_and_split(tmp_path, mode, reversed_volumes):
    """GE's epi_pepolar stores reversed-polarity volumes with their rows reversed and the header
    unchanged; UserData12 says which (0 none, 1 all, 2 odd, 3 even temporal positions). They are
    read in header order and, where both polarities share a series, are two series as dcm2niix
    writes them. Checked outside the project against dcm_qa_polar's references."""
    aff = make_affine(AXIAL, (0, 0))
    truth = {1: volume((3, 6, 7), seed=41), 2: volume((3, 6, 7), seed=42)}
    for tpi in (1, 2):
        stored = truth[tpi][:, ::-1, :] if tpi in reversed_volumes else truth[tpi]
        for p in write_classic(tmp_path / "fm", stored, aff, instance0=3 * (tpi - 1), names=f"V{tpi}_",
                               manufacturer="GE MEDICAL SYSTEMS", TemporalPositionIdentifier=tpi):
            ds = pydicom.dcmread(p)
            block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
            block.add_new(0x9C, "LO", "research/ABCD/epi_pepolar")
            block.add_new(0xB3, "DS", f"{mode}.000000")
            save(ds, p)
    infos, _ = scan(tmp_path / "fm")
    groups, _ = group_series(infos)
    both = 0 < len(reversed_volumes) < 2
    assert len(groups) == (2 if both else 1)
    for g in groups:
        vol, _, meta = read_series(g.files, infos=infos)
        vols = {fi.path: fi for fi in infos}
        tpis = sorted({int(pydicom.dcmread(f, stop_before_pixels=True).TemporalPositionIdentifier) for f in g.files})
        want = np.stack([truth[t] for t in tpis]) if len(tpis) > 1 else truth[tpis[0]]
        np.testing.assert_array_equal(vol, want)
        assert meta.get("rows_reversed_by_scanner", False) == (tpis[0] in reversed_volumes)
        assert all(vols[f].rows_reversed == (tpis[0] in reversed_volumes) for f in g.files)
    if both:
        with pytest.raises(SeriesError, match="both phase-encoding polarities"):
            read_series(sorted((tmp_path / "fm").iterdir()))


# ---------------------------------------------------------------------------- colour

def write_colour(folder: Path, rgb: np.ndarray, affine: np.ndarray, pi="RGB", planar=0, series_uid=None,
                 **kw) -> list[Path]:
    """One 8-bit colour file per slice of rgb[z, y, x, 3], stored as `pi` ("RGB", "YBR_FULL",
    "YBR_FULL_422"), colour-by-pixel (planar 0) or colour-by-plane (planar 1)."""
    from pydicom.pixels import convert_color_space

    folder.mkdir(parents=True, exist_ok=True)
    row = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    paths = []
    for k in range(rgb.shape[0]):
        ds = base_dataset(series_uid=series_uid or "1.2.826.0.1.3680043.8.498.1", **kw)
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = rgb.shape[1], rgb.shape[2]
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in np.concatenate([row, col])]
        ds.ImagePositionPatient = [f"{v:.8f}" for v in affine[:3, 3] + k * affine[:3, 0]]
        ds.PixelSpacing = [f"{float(np.linalg.norm(affine[:3, i])):.10f}" for i in (1, 2)]
        ds.SliceThickness = float(np.linalg.norm(affine[:3, 0]))
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, pi, planar
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        sl = rgb[k].astype(np.uint8)
        if pi.startswith("YBR"):
            sl = convert_color_space(sl, "RGB", "YBR_FULL")
        if pi == "YBR_FULL_422":   # Y of every pixel, Cb and Cr of every other column: Y1 Y2 Cb Cr
            y, cb, cr = sl[..., 0], sl[:, 0::2, 1], sl[:, 0::2, 2]
            sl = np.stack([y[:, 0::2], y[:, 1::2], cb, cr], axis=-1)
        elif planar == 1:
            sl = np.ascontiguousarray(sl.transpose(2, 0, 1))
        ds.PixelData = np.ascontiguousarray(sl).tobytes()
        ds["PixelData"].VR = "OB"
        paths.append(save(ds, folder / f"IM{k + 1:04d}.dcm"))
    return paths


def _rgb(shape=(4, 6, 8), seed=5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3)).astype(np.uint8)


@pytest.mark.parametrize("pi, planar", [("RGB", 0), ("RGB", 1), ("YBR_FULL", 0), ("YBR_FULL_422", 0)])
def test_colour_series_reads_as_rgb_on_a_trailing_axis(tmp_path, pi, planar):
    """A colour series (a fused map, an annotated copy) is RGB in (Z, Y, X, 3), YBR converted
    as pydicom and dcm2niix do; its geometry is the greyscale one's. Checked against dcm2niix's
    RGB24 NIfTI, channel by channel, where dcm2niix is installed."""
    rgb = _rgb()
    if pi == "YBR_FULL_422":   # chroma shared by column pairs: the image must carry no more
        rgb[:, :, 1::2] = rgb[:, :, 0::2]
    aff = make_affine(AXIAL, (10, -20))
    write_colour(tmp_path / "in", rgb, aff, pi=pi, planar=planar)
    got, gaff, meta = read_series(tmp_path / "in")
    assert got.shape == (4, 6, 8, 3) and meta["samples_per_pixel"] == 3
    assert meta["photometric_interpretation"] == "RGB" and meta["stored_photometric_interpretation"] == pi
    np.testing.assert_allclose(gaff, aff, atol=1e-6)
    # YBR round trips through 8-bit integers: one unit either way
    np.testing.assert_allclose(got, rgb, atol=0 if pi == "RGB" else 2)
    if DCM2NIIX and pi != "YBR_FULL_422":
        import nibabel as nib

        out = tmp_path / "out"
        out.mkdir()
        res = subprocess.run([DCM2NIIX, "-b", "n", "-z", "n", "-f", "v", "-o", str(out), str(tmp_path / "in")],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        img = nib.load(next(out.glob("*.nii")))
        raw = np.asanyarray(img.dataobj)
        assert raw.dtype.names == ("R", "G", "B")
        for c, name in enumerate("RGB"):
            compare_to_nifti(got[..., c], gaff, nib.Nifti1Image(raw[name].astype(np.float32), img.affine),
                             atol_mm=0.01, atol=0 if pi == "RGB" else 2)


def test_palette_colour_is_looked_up_not_read_as_indices(tmp_path):
    """PALETTE COLOR keeps one sample a pixel: read as greyscale, its indices would pass for an image."""
    aff = make_affine(AXIAL)
    idx = np.random.default_rng(3).integers(0, 4, (3, 5, 6)).astype(np.uint8)
    lut = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint16)
    paths = write_classic(tmp_path / "in", idx.astype(np.int16), aff)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PhotometricInterpretation = "PALETTE COLOR"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        z = int(ds.InstanceNumber) - 1
        ds.PixelData = idx[z].tobytes()
        ds["PixelData"].VR = "OB"
        for c, name in enumerate(("Red", "Green", "Blue")):
            setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [4, 0, 8])
            ds[f"{name}PaletteColorLookupTableDescriptor"].VR = "US"
            setattr(ds, f"{name}PaletteColorLookupTableData", lut[:, c].astype(np.uint8).tobytes())
        save(ds, p)
    got, _, meta = read_series(tmp_path / "in")
    assert meta["samples_per_pixel"] == 3 and meta["stored_photometric_interpretation"] == "PALETTE COLOR"
    np.testing.assert_array_equal(got, lut[idx].astype(np.float32))
    # ingest's way, with the scan's infos: the fast path must not take the indices for an image
    infos, _ = scan(tmp_path / "in")
    assert all(fi.plan is None for fi in infos)
    np.testing.assert_array_equal(read_series(paths, infos=infos)[0], lut[idx].astype(np.float32))


def test_colour_layouts_the_standard_does_not_have_and_mixed_series_are_refused(tmp_path):
    aff = make_affine(AXIAL)
    bad = write_colour(tmp_path / "bad", _rgb((2, 4, 4)), aff)
    ds = pydicom.dcmread(bad[0])
    ds.PhotometricInterpretation = "MONOCHROME2"   # three samples said to be grey
    save(ds, bad[0])
    with pytest.raises(SeriesError) as err:
        read_series(bad)
    assert str(err.value).startswith(str(bad[0])) and "3 sample(s) per pixel with PhotometricInterpretation " \
        "MONOCHROME2" in str(err.value) and "\n" not in str(err.value)
    # YBR_ICT / YBR_RCT / YBR_PARTIAL_* exist only inside compressed pixel data
    ict = write_colour(tmp_path / "ict", _rgb((1, 4, 4)), aff)
    ds = pydicom.dcmread(ict[0])
    ds.PhotometricInterpretation = "YBR_ICT"
    save(ds, ict[0])
    with pytest.raises(SeriesError, match="YBR_ICT in uncompressed pixel data"):
        read_series(ict)
    # a colour copy filed under the greyscale series' UID
    grey = write_classic(tmp_path / "mix", volume((2, 4, 4), seed=2), aff)
    colour = write_colour(tmp_path / "mix2", _rgb((2, 4, 4)), make_affine(AXIAL, origin=(-40.0, -55.5, 30.0)))
    with pytest.raises(SeriesError, match="mixes colour and greyscale images"):
        read_series(grey + colour)
    # a colour file whose pixel data holds one plane only: short, not read as a grey image
    short = write_colour(tmp_path / "short", _rgb((1, 8, 8)), aff)
    ds = pydicom.dcmread(short[0])
    ds.PixelData = ds.PixelData[: 8 * 8]
    save(ds, short[0])
    with pytest.raises(SeriesError, match=r"3 sample\(s\) .* far more than the 64 bytes"):
        read_series(short)


def test_colour_samples_are_not_rescaled(tmp_path):
    """RescaleSlope/Intercept (the Modality LUT) apply to greyscale pixels only (PS3.3 C.11.1)."""
    rgb = _rgb((2, 4, 4))
    write_colour(tmp_path / "in", rgb, make_affine(AXIAL), RescaleSlope=2, RescaleIntercept=-10)
    np.testing.assert_array_equal(read_series(tmp_path / "in")[0], rgb)


def test_view_shows_a_colour_and_a_4d_series_of_an_exam_folder(tmp_path):
    from ingest.view import _exam_series, render

    aff = make_affine(AXIAL)
    rgb = _rgb((3, 8, 8))
    write_colour(tmp_path / "exam" / "S001", rgb, aff, description="fused")
    vols = {t: volume((3, 8, 8), seed=t) for t in (1, 2)}
    for t in (1, 2):
        write_classic(tmp_path / "exam" / "S002", vols[t], aff, instance0=3 * (t - 1), description="fmri",
                      names=f"V{t}_", series_uid="1.2.826.0.1.3680043.8.498.9", TemporalPositionIdentifier=t)
    series = {title: vol for title, vol, _ in _exam_series(tmp_path / "exam")}
    assert set(series) == {"fused", "fmri (volume 1 of 2)"}
    np.testing.assert_array_equal(series["fused"], rgb)
    np.testing.assert_array_equal(series["fmri (volume 1 of 2)"], vols[1])
    assert render(tmp_path / "exam", tmp_path / "v.png").stat().st_size > 1000


def test_an_error_line_names_a_reason_even_when_the_message_is_empty():
    from ingest import first_line

    assert first_line(ValueError("bad tag\n  traceback detail")) == "bad tag"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError(" \n")) == "OSError"
