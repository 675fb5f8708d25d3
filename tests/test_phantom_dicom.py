"""Tests of ingest.phantom.dicomio (DICOM writer) and tests/niftiref.py (NIfTI comparison)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import config as dcm_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for niftiref

from ingest.phantom import dicomio  # noqa: E402
from ingest.phantom.dicomio import (  # noqa: E402
    affine_from_datasets,
    dicom_uid,
    format_ds,
    geometry_from_affine,
    read_series,
    round_affine_for_dicom,
    write_series,
)
from niftiref import compare_to_nifti, nifti_to_zyx_lps  # noqa: E402
from niftiref import rot as _rot  # noqa: E402

def _testdata() -> Path:
    """Shared vendor DICOM test data: $QSNET_TESTDATA, else ../shared/testdata beside the repository."""
    if os.environ.get("QSNET_TESTDATA"):
        return Path(os.environ["QSNET_TESTDATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "testdata"


TESTDATA = _testdata() / "dicom"
DCM2NIIX = shutil.which("dcm2niix")


# ----------------------------------------------------------------- fixtures




def make_affine(spacing_zyx=(3.3, 0.94, 1.17), rot=(10.0, 5.0), sign=1.0,
                origin=(-87.25, -131.7, 42.125), base=None) -> np.ndarray:
    """Double-oblique axial-ish affine in the project convention."""
    base = np.eye(3) if base is None else np.asarray(base, float)
    r = _rot(0, rot[0]) @ _rot(1, rot[1]) @ base  # columns: row cos, col cos, normal
    row_cos, col_cos, normal = r[:, 0], r[:, 1], r[:, 2]
    a = np.eye(4)
    a[:3, 0] = sign * normal * spacing_zyx[0]
    a[:3, 1] = col_cos * spacing_zyx[1]
    a[:3, 2] = row_cos * spacing_zyx[2]
    a[:3, 3] = origin
    return a


def make_volume(shape=(7, 24, 32), dtype=np.uint16, offset=0) -> np.ndarray:
    z, y, x = np.indices(shape)
    v = 100 + 7 * x + 3 * y + 50 * z + offset
    v[:, 2:6, 3:12] += 900  # asymmetric block: top-left, not mirrored anywhere
    v[min(2, shape[0] - 1), 15:18, 25:27] += 1500  # a second block in one slice only
    return v.astype(dtype)


def make_series(**kw) -> dict:
    s = {
        "kind": "tse", "series_number": 6, "description": "t2_tse_tra", "protocol": "t2_tse_tra",
        "sequence_name": "*tse2d1_14", "image_type": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
        "scanning_sequence": "SE", "sequence_variant": ["SK", "SP", "OSP"], "acq_type": "2D",
        "tr": 5500.0, "te": 117.0, "flip_angle": 90.0, "etl": 14, "thickness": 3.0, "gap": 0.3,
        "pixel_spacing": 0.94, "fov": 256.0, "acq_matrix": 160,
        "series_uid": dicom_uid("test", "series", "6"), "role": "t2w",
        "acquisition_time": "101530.250000",
    }
    s.update(kw)
    return s


def make_exam(**kw) -> dict:
    e = {
        "manufacturer": "SIEMENS", "model": "Prisma", "software_versions": "syngo MR XA30",
        "station_name": "MRC35210", "field_strength": 3.0,
        "institution": "Northgate University Hospital", "address": "14 Harbour Road, Eastport",
        "physicians": ["DOE^JOHN", "ROE^MARY"], "patient_name": "PHANTOM^A001",
        "patient_id": "SA-001", "birth_date": "19790312", "sex": "F", "age": "045Y",
        "weight": 61.5, "height": 1.68, "study_date": "20240305", "study_time": "100102.000000",
        "accession": "A0001", "study_id": "1", "study_uid": dicom_uid("test", "study"),
        "frame_of_reference_uid": dicom_uid("test", "for"), "study_description": "BRAIN^QSNET",
        "patient_position": "HFS", "uid_seed": "test-seed",
    }
    e.update(kw)
    return e


GE_EXAM = dict(manufacturer="GE MEDICAL SYSTEMS", model="SIGNA Premier",
               software_versions="30\\LX\\MR Software release:MR30.1_R02",
               station_name="PREMIER3T")


@pytest.fixture
def strict():
    """Raise on any invalid value, writing and reading."""
    old_w = dcm_config.settings.writing_validation_mode
    old_r = dcm_config.settings.reading_validation_mode
    dcm_config.settings.writing_validation_mode = dcm_config.RAISE
    dcm_config.settings.reading_validation_mode = dcm_config.RAISE
    try:
        yield
    finally:
        dcm_config.settings.writing_validation_mode = old_w
        dcm_config.settings.reading_validation_mode = old_r


def _read_all_strict(paths):
    dss = []
    for p in paths:
        with dcm_config.strict_reading():
            ds = pydicom.dcmread(p)  # no force: needs preamble + DICM + file meta
            for elem in ds.iterall():  # convert every raw element, validating its value
                _ = elem.value
        dss.append(ds)
    return dss


def _flip_z(volume, affine):
    a = affine.copy()
    a[:3, 3] = affine[:3, 3] + (volume.shape[0] - 1) * affine[:3, 0]
    a[:3, 0] = -affine[:3, 0]
    return volume[::-1], a


# -------------------------------------------------------------------- unit tests


def test_dicom_uid_deterministic_and_valid():
    u = dicom_uid("a", "b", "1")
    assert u == dicom_uid("a", "b", "1") and u != dicom_uid("a", "b", "2")
    assert u.startswith("2.25.") and len(u) <= 64
    assert pydicom.uid.UID(u).is_valid
    assert dicom_uid("a|b") == dicom_uid("a", "b")  # documented joining rule


def test_format_ds_fits_and_keeps_precision():
    for v in [0.1, 0.94, 3.3, -123.456789012345678, 0.984807753012208, -0.173648177666930,
              1.2246467991473532e-16, -9.999999999999999, 99999.99999999999, 1e-17, 1e20,
              -0.0, 12345.678901234567]:
        s = format_ds(v, fixed=True)
        assert len(s) <= 16, s
        if abs(v) < 1e15:
            assert abs(float(s) - v) <= 1e-10 * max(1.0, abs(v)), (v, s)
    assert format_ds(0.94) == "0.94" and format_ds(4.0) == "4" and format_ds(-0.0) == "0"
    assert float(format_ds(1.2345678901234e-7)) == pytest.approx(1.2345678901234e-7, rel=1e-9)


def test_geometry_from_affine_matches_contract():
    a = make_affine()
    g = geometry_from_affine(a)
    row, col = np.array(g["iop"][:3]), np.array(g["iop"][3:])
    np.testing.assert_allclose(row * g["pixel_spacing"][1], a[:3, 2], atol=1e-12)
    np.testing.assert_allclose(col * g["pixel_spacing"][0], a[:3, 1], atol=1e-12)
    assert g["pixel_spacing"] == pytest.approx([0.94, 1.17])
    assert g["spacing_between_slices"] == pytest.approx(3.3) and g["slice_direction"] == 1
    np.testing.assert_allclose(g["slice_positions"](3)[2], a[:3, 3] + 2 * a[:3, 0])
    assert geometry_from_affine(make_affine(sign=-1))["slice_direction"] == -1


def test_round_affine_is_close_and_idempotent():
    a = make_affine()
    r = round_affine_for_dicom(a)
    assert np.max(np.abs(r - a)) < 1e-9
    np.testing.assert_array_equal(round_affine_for_dicom(r)[:, 1:], r[:, 1:])
    np.testing.assert_allclose(round_affine_for_dicom(r), r, atol=1e-12)
    # nice axis-aligned numbers survive bit-exact
    # columns: slice step (+S, 4.4 mm), row index (+P, 0.94), column index (+L, 0.94), IPP
    b = np.array([[0, 0, 0.94, -120.5], [0, 0.94, 0, -100.25], [4.4, 0, 0, -30.0], [0, 0, 0, 1.0]])
    b = b[[2, 1, 0, 3]]
    rb = round_affine_for_dicom(b)
    np.testing.assert_array_equal(rb[:, 1:], b[:, 1:])
    # the step is a difference of two written positions: exact only to ~1e-14
    np.testing.assert_allclose(rb[:, 0], b[:, 0], atol=1e-12, rtol=0)


# ----------------------------------------------------------- write / read-back


@pytest.mark.parametrize("transfer_syntax", ["explicit", "implicit"])
@pytest.mark.parametrize("instance_order", ["inferior_to_superior", "superior_to_inferior"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_roundtrip_uint16_siemens(tmp_path, strict, transfer_syntax, instance_order, sign):
    vol = make_volume()
    aff = make_affine(sign=sign)
    out = tmp_path / "series"
    paths = write_series(out, vol, aff, make_series(), make_exam(),
                         instance_order=instance_order, transfer_syntax=transfer_syntax)
    assert [p.name for p in paths] == [f"IM{i:04d}.dcm" for i in range(1, 8)]
    assert sorted(out.iterdir()) == sorted(paths)
    dss = _read_all_strict(paths)
    ts = {"explicit": pydicom.uid.ExplicitVRLittleEndian,
          "implicit": pydicom.uid.ImplicitVRLittleEndian}[transfer_syntax]
    sops = set()
    for i, ds in enumerate(dss, start=1):
        assert ds.preamble is not None and len(ds.preamble) == 128
        assert ds.file_meta.TransferSyntaxUID == ts
        assert ds.SOPClassUID == dicomio.MR_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.SOPInstanceUID == dicom_uid("test-seed", make_series()["series_uid"], str(i))
        assert ds.file_meta.ImplementationClassUID == dicom_uid("qsnet", "implementation")
        assert ds.file_meta.ImplementationVersionName == "QSNET_0_1"
        assert ds.InstanceNumber == i
        assert ds.BitsStored == 12 and ds.HighBit == 11 and ds.PixelRepresentation == 0
        assert float(ds.SpacingBetweenSlices) == pytest.approx(3.3)
        assert float(ds.SliceThickness) == 3.0
        assert float(ds.ImagingFrequency) == pytest.approx(127.732436, abs=1e-6)
        assert "RescaleSlope" not in ds and "RescaleType" not in ds
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            assert all(len(str(v)) <= 16 for v in ds[kw].value)
        normal = np.cross(np.array(ds.ImageOrientationPatient[:3], float),
                          np.array(ds.ImageOrientationPatient[3:], float))
        assert float(ds.SliceLocation) == pytest.approx(
            float(np.array(ds.ImagePositionPatient, float) @ normal), abs=1e-8)
        sops.add(ds.SOPInstanceUID)
    assert len(sops) == 7
    # instance order: S (LPS z) coordinate of IPP increases / decreases with InstanceNumber
    s = [float(ds.ImagePositionPatient[2]) for ds in dss]
    assert s == sorted(s, reverse=(instance_order == "superior_to_inferior"))

    # geometry: read back sorted along +normal; for a negative step that is z reversed
    exp_vol, exp_aff = (vol, aff) if sign > 0 else _flip_z(vol, aff)
    got = affine_from_datasets(dss)
    np.testing.assert_allclose(got, round_affine_for_dicom(exp_aff), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, exp_aff, atol=1e-4, rtol=0)
    # pixels
    rvol, raff, _ = read_series(out)
    np.testing.assert_array_equal(rvol, exp_vol)
    assert rvol.dtype == np.uint16
    np.testing.assert_allclose(raff, got, atol=1e-12)
    # given order, no sorting: the z order written (instance order reversed if needed)
    by_z = sorted(dss, key=lambda d: float(np.array(d.ImagePositionPatient, float)
                                           @ (aff[:3, 0] / np.linalg.norm(aff[:3, 0]))))
    np.testing.assert_allclose(affine_from_datasets(by_z, sort=False),
                               round_affine_for_dicom(aff), atol=1e-6, rtol=0)


def test_roundtrip_int16_rescaled_ge_map(tmp_path, strict):
    vol = (make_volume(dtype=np.int32) - 600).astype(np.int16)
    assert vol.min() < 0
    aff = make_affine(spacing_zyx=(5.0, 1.17, 1.17), rot=(-7.0, 12.0),
                      origin=(110.3, -95.0, -20.0))
    series = make_series(kind="mrf", output="t1", description="MRF-FISP T1 Map",
                         image_type=["DERIVED", "PRIMARY", "T1MAP"], thickness=5.0, gap=0.0,
                         units="ms", ti=18.0, sequence_name="mrf_fisp", series_number=700)
    paths = write_series(tmp_path / "s", vol, aff, series, make_exam(**GE_EXAM),
                         rescale_slope=0.5, rescale_type="ms",
                         instance_order="superior_to_inferior")
    dss = _read_all_strict(paths)
    ds = dss[0]
    assert ds.PixelRepresentation == 1 and ds.BitsStored == 16 and ds.HighBit == 15
    assert float(ds.RescaleSlope) == 0.5 and float(ds.RescaleIntercept) == 0.0
    assert ds.RescaleType == "US"
    assert ds.DerivationDescription == "T1 map, ms"
    rwv = ds.RealWorldValueMappingSequence[0]
    assert rwv.MeasurementUnitsCodeSequence[0].CodeValue == "ms"
    assert rwv.RealWorldValueSlope == 0.5
    assert ds.ImageType[0] == "DERIVED"
    assert list(ds.SoftwareVersions) == ["30", "LX", "MR Software release:MR30.1_R02"]
    assert ds[0x0019, 0x0010].value == "GEMS_ACQU_01"
    assert ds.private_block(0x0019, "GEMS_ACQU_01")[0x9C].value == "mrf_fisp"
    assert ds.InversionTime == 18.0
    s = [float(d.ImagePositionPatient[2]) for d in dss]
    assert s == sorted(s, reverse=True)  # GE: instance 1 is the most superior
    rvol, raff, rdss = read_series(paths)
    np.testing.assert_array_equal(rvol, vol)
    assert rvol.dtype == np.int16
    phys = rvol * float(rdss[0].RescaleSlope) + float(rdss[0].RescaleIntercept)
    np.testing.assert_array_equal(phys, vol * 0.5)
    np.testing.assert_allclose(raff, round_affine_for_dicom(aff), atol=1e-6, rtol=0)
    # window on physical values
    assert float(ds.WindowWidth) > 0
    assert phys.min() <= float(ds.WindowCenter) <= phys.max()


def test_uint16_large_values_use_16_bits_and_bits_stored_override(tmp_path, strict):
    vol = make_volume(offset=4000)
    paths = write_series(tmp_path / "a", vol, make_affine(), make_series(), make_exam())
    assert pydicom.dcmread(paths[0]).BitsStored == 16
    with pytest.raises(ValueError, match="bits_stored"):
        write_series(tmp_path / "b", vol, make_affine(), make_series(), make_exam(),
                     bits_stored=12)


def test_single_slice_reads_back_along_normal(tmp_path, strict):
    vol = make_volume(shape=(1, 24, 32))
    aff = make_affine()
    paths = write_series(tmp_path / "one", vol, aff, make_series(), make_exam())
    np.testing.assert_allclose(affine_from_datasets(_read_all_strict(paths)),
                               round_affine_for_dicom(aff), atol=1e-6, rtol=0)


def test_sagittal_orientation(tmp_path, strict):
    # axis-aligned sagittal as in the Siemens example: IOP [0, 1, 0, 0, 0, -1]
    a = np.eye(4)
    a[:3, 2] = np.array([0.0, 1.0, 0.0]) * 1.0  # row cosine * column spacing
    a[:3, 1] = np.array([0.0, 0.0, -1.0]) * 1.2  # column cosine * row spacing
    a[:3, 0] = np.cross([0.0, 1.0, 0.0], [0.0, 0.0, -1.0]) * 3.3
    a[:3, 3] = [-20.0, -130.0, 130.0]
    vol = make_volume()
    for order in ("inferior_to_superior", "superior_to_inferior"):
        paths = write_series(tmp_path / order, vol, a, make_series(), make_exam(),
                             instance_order=order)
        rvol, raff, _ = read_series(paths)
        np.testing.assert_array_equal(rvol, vol)
        np.testing.assert_allclose(raff, a, atol=1e-9)


def test_refuses_bad_input(tmp_path):
    vol, aff, s, e = make_volume(), make_affine(), make_series(), make_exam()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_series(busy, vol, aff, s, e)
    with pytest.raises(ValueError, match="3-D"):
        write_series(tmp_path / "a", vol[0], aff, s, e)
    with pytest.raises(ValueError, match="uint16 or int16"):
        write_series(tmp_path / "b", vol.astype(np.float32), aff, s, e)
    with pytest.raises(ValueError, match="4x4"):
        write_series(tmp_path / "c", vol, aff[:3], s, e)
    with pytest.raises(ValueError, match="last row"):
        bad = aff.copy()
        bad[3, 0] = 1.0
        write_series(tmp_path / "d", vol, bad, s, e)
    with pytest.raises(ValueError, match="not orthogonal"):
        bad = aff.copy()
        bad[:3, 1] += 0.1 * bad[:3, 2]
        write_series(tmp_path / "e", vol, bad, s, e)
    with pytest.raises(ValueError, match="slice normal"):
        bad = aff.copy()
        bad[:3, 0] += 0.2 * bad[:3, 2]
        write_series(tmp_path / "f", vol, bad, s, e)
    with pytest.raises(ValueError, match="thickness"):
        write_series(tmp_path / "g", vol, aff, make_series(gap=0.0), e)
    with pytest.raises(ValueError, match="instance_order"):
        write_series(tmp_path / "h", vol, aff, s, e, instance_order="random")
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_series(tmp_path / "i", vol, aff, s, e, transfer_syntax="big")
    assert not any((tmp_path / n).exists() for n in "abcdefghi")  # nothing half-written


def test_deterministic_bytes(tmp_path):
    args = (make_volume(), make_affine(), make_series(), make_exam())
    p1 = write_series(tmp_path / "1", *args)
    p2 = write_series(tmp_path / "2", *args)
    assert [p.read_bytes() for p in p1] == [p.read_bytes() for p in p2]


# ------------------------------------------------------------------- dcm2niix


def _dcm2niix(indir: Path, outdir: Path) -> Path:
    outdir.mkdir()
    proc = subprocess.run([DCM2NIIX, "-b", "n", "-z", "n", "-f", "out", "-o", str(outdir),
                           str(indir)], capture_output=True, text=True, timeout=60)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "error" not in log.lower(), log
    niis = sorted(outdir.glob("*.nii"))
    assert len(niis) == 1, (niis, log)
    return niis[0]


@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not on PATH")
@pytest.mark.parametrize("case", ["siemens_uint16", "ge_int16_map_negstep", "implicit_sag"])
def test_dcm2niix_agrees(tmp_path, case):
    if case == "siemens_uint16":
        vol, aff = make_volume(), make_affine()
        kw, exam, series, slope = {}, make_exam(), make_series(), 1.0
    elif case == "ge_int16_map_negstep":
        vol = (make_volume(dtype=np.int32) - 600).astype(np.int16)
        aff = make_affine(spacing_zyx=(5.0, 1.17, 1.17), rot=(-7.0, 12.0), sign=-1.0)
        series = make_series(kind="mrf", output="t1", thickness=5.0, gap=0.0, units="ms",
                             image_type=["DERIVED", "PRIMARY", "T1MAP"])
        exam, slope = make_exam(**GE_EXAM), 0.5
        kw = dict(rescale_slope=0.5, rescale_type="ms", instance_order="superior_to_inferior")
    else:
        base = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # sagittal
        vol, aff = make_volume(), make_affine(base=base, rot=(4.0, -9.0))
        kw, exam, series, slope = {"transfer_syntax": "implicit"}, make_exam(), make_series(), 1.0
    write_series(tmp_path / "dcm", vol, aff, series, exam, **kw)
    nii = _dcm2niix(tmp_path / "dcm", tmp_path / "nii")
    compare_to_nifti(vol.astype(np.float64) * slope, round_affine_for_dicom(aff), nii, atol_mm=0.01)
    compare_to_nifti(vol.astype(np.float64) * slope, aff, nii, atol_mm=0.01)
    with pytest.raises(AssertionError, match="geometry"):
        shifted = aff.copy()
        shifted[:3, 3] += [0.0, 0.05, 0.0]
        compare_to_nifti(vol.astype(np.float64) * slope, shifted, nii)
    with pytest.raises(AssertionError, match="voxels differ"):
        other = vol.astype(np.float64) * slope
        other[3, 4, 5] += 1.0
        compare_to_nifti(other, aff, nii)


# ---------------------------------------------------------------- niftiref alone


def _random_ornt_nifti(path, data_xyz, aff_ras, perm, flips):
    """Store the same grid with voxel axes permuted / flipped (as converters do)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff
    ornt = np.array([[p, -1.0 if f else 1.0] for p, f in zip(perm, flips)])
    # ornt maps our axis i to output axis perm[i]
    new = apply_orientation(data_xyz, ornt)
    new_aff = aff_ras @ inv_ornt_aff(ornt, data_xyz.shape[:3])
    img = nib.Nifti1Image(new.astype(np.int16), new_aff)
    img.header.set_slope_inter(0.25, 3.0)
    img.set_qform(new_aff, code=1)
    img.set_sform(new_aff, code=1)
    nib.save(img, str(path))


@pytest.mark.parametrize("ndim", [3, 4])
@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (False, True, False)),
                                         ((2, 0, 1), (True, False, True)),
                                         ((1, 2, 0), (False, False, False))])
def test_compare_to_nifti_any_orientation(tmp_path, ndim, perm, flips):
    rng = np.random.default_rng(0)
    shape = (5, 6, 7) if ndim == 3 else (3, 5, 6, 7)  # (t,) z, y, x
    stored = rng.integers(-200, 2000, size=shape).astype(np.int16)
    phys = stored * 0.25 + 3.0
    aff = make_affine(spacing_zyx=(2.0, 1.5, 1.25), rot=(44.0, -30.0))  # near 45 deg on purpose
    data_xyz = stored.transpose(2, 1, 0) if ndim == 3 else stored.transpose(3, 2, 1, 0)
    from niftiref import zyx_lps_to_xyz_ras
    p = tmp_path / "x.nii"
    _random_ornt_nifti(p, data_xyz, zyx_lps_to_xyz_ras(aff), perm, flips)
    compare_to_nifti(phys, aff, p)
    # nifti_to_zyx_lps: a pure re-expression, same world positions
    d, a = nifti_to_zyx_lps(p)
    assert d.ndim == ndim
    img = nib.load(str(p))
    ijk = np.array([1, 2, 3, 1.0])
    ras = img.affine @ ijk
    np.testing.assert_allclose(a @ ijk[[2, 1, 0, 3]], ras * [-1, -1, 1, 1], atol=1e-4)
    np.testing.assert_allclose(d[(..., 3, 2, 1)], img.dataobj.get_unscaled()[1, 2, 3] * 0.25 + 3.0)
    with pytest.raises(AssertionError, match="shape"):
        compare_to_nifti(phys[..., :-1], aff, p)


# ------------------------------------------------ real vendor files (shared testdata)


@pytest.mark.skipif(not (TESTDATA / "dcm_qa_decubitus").is_dir(), reason="no shared testdata")
def test_compare_to_nifti_real_siemens_reference():
    """affine_from_datasets + compare_to_nifti against dcm2niix's Ref of a Siemens sagittal."""
    case = TESTDATA / "dcm_qa_decubitus" / "HFS_3_t1_fl2d_sag"
    vol, aff, _ = read_series(case / "In")
    ref = next((case / "Ref").glob("*.nii*"))
    compare_to_nifti(vol.astype(np.float64), aff, ref, atol_mm=0.01)


@pytest.mark.skipif(not (TESTDATA / "dcm_qa_nih" / "GE_mr_0004").is_dir(),
                    reason="no shared testdata")
def test_compare_to_nifti_real_ge_4d_reference():
    """4-D: 15 slices x 10 volumes of GE single-frame files against dcm2niix's Ref."""
    files = sorted((TESTDATA / "dcm_qa_nih" / "GE_mr_0004" / "In").iterdir())
    dss = [pydicom.dcmread(f) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.array(d.ImagePositionPatient, float) @ normal for d in dss])
    levels = np.unique(np.round(pos, 3))
    vols = []
    for lev in levels:
        at = sorted((d for d, p in zip(dss, pos) if abs(p - lev) < 1e-3),
                    key=lambda d: int(d.InstanceNumber))
        vols.append([d.pixel_array for d in at])
    data = np.array(vols).transpose(1, 0, 2, 3)  # (t, z, y, x)
    aff = affine_from_datasets([next(d for d, p in zip(dss, pos) if abs(p - lev) < 1e-3)
                                for lev in levels])
    ref = next((TESTDATA / "dcm_qa_nih" / "GE_mr_0004" / "Ref").glob("*.nii*"))
    compare_to_nifti(data.astype(np.float64), aff, ref, atol_mm=0.01)
