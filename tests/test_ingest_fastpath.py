"""The classic-file fast path (ingest.dicomlite) against pydicom: identical results or a decline.

Every real vendor series of ../shared/testdata and every phantom series is read twice, with the
fast path and with QSNET_DICOM_FASTPATH=0 (pydicom only): arrays, affines, metadata and the
scan's header summaries must be identical. Files the fast path does not handle must be declined,
never half-read.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from ingest.dicomlite import read_lite
from ingest.manifest import file_sha256
from ingest.reader import plan_is_current, read_series
from ingest.series import _read_header, scan

TESTDATA = Path(os.environ.get("QSNET_TESTDATA") or Path(__file__).resolve().parents[2] / "shared" / "testdata") / "dicom"
GOLDEN = sorted(TESTDATA.glob("*/*/In")) if TESTDATA.is_dir() else []


def both(monkeypatch, fn):
    monkeypatch.setenv("QSNET_DICOM_FASTPATH", "1")
    fast = fn()
    monkeypatch.setenv("QSNET_DICOM_FASTPATH", "0")
    slow = fn()
    monkeypatch.delenv("QSNET_DICOM_FASTPATH")
    return fast, slow


def same_read(fast, slow):
    (a, aff, meta), (b, bff, bmeta) = fast, slow
    assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(aff, bff)
    assert meta == bmeta


@pytest.mark.parametrize("folder", GOLDEN, ids=[f"{p.parent.parent.name}/{p.parent.name}" for p in GOLDEN])
def test_vendor_series_identical(folder, monkeypatch):
    files = sorted(p for p in folder.iterdir() if p.is_file())
    fast, slow = both(monkeypatch, lambda: read_series(files))
    same_read(fast, slow)
    # with the scan's read plans (each file parsed once): the same result again
    infos, _ = scan(folder)
    same_read(read_series(files, infos=infos), slow)
    for f in files:
        h_fast, h_slow = both(monkeypatch, lambda f=f: _read_header(f, f.stat().st_size))
        assert h_fast == h_slow, f


def test_fast_path_is_taken_and_declines_the_rest():
    if not GOLDEN:
        pytest.skip("no shared testdata")
    taken = {p.parent.parent.name + "/" + p.parent.name: read_lite(next(p.iterdir())) is not None for p in GOLDEN}
    # classic single-frame files of three vendors take it
    for name in ("dcm_qa_decubitus/HFS_3_t1_fl2d_sag", "dcm_qa_nih/GE_mr_0004", "dcm_qa_philips_enh/cl_1901_3DpCASL"):
        assert taken[name], name
    # mosaics (1, 2), big endian, compressed syntaxes, enhanced multi-frame: pydicom
    for name in ("1_ExplicitVRLittleEndian", "2_ImplicitVRLittleEndian", "3_ExplicitVRBigEndian",
                 "4_RLELossless", "9_JPEG2000Lossless"):
        assert not taken[f"dcm_qa_ts/{name}"], name
    assert not taken["dcm_qa_philips_enh/enh_1901_WIP_3DpCASL_real"]
    assert not taken["dcm_qa_xa30/5_anat-T1w_acq-tfl"]


def test_phantom_series_identical(demo_tree, monkeypatch):
    for series in sorted(demo_tree.glob("site-*/sub-?01/S*")):
        files = sorted(series.iterdir())
        fast, slow = both(monkeypatch, lambda files=files: read_series(files))
        same_read(fast, slow)
        infos, problems = scan(series)
        assert not problems and all(i.plan is not None for i in infos), series
        same_read(read_series(files, infos=infos), slow)


def test_read_plan_of_a_changed_file_is_not_used(tmp_path):
    """A file rewritten between the scan and the read is parsed again, not read at its old
    pixel offset; the planned and unplanned reads agree before and after."""
    uid = generate_uid()
    files = [_classic(tmp_path / f"{k}.dcm", SeriesInstanceUID=uid, ImagePositionPatient=[0, 0, k], InstanceNumber=k + 1)
             for k in range(3)]
    infos, problems = scan(tmp_path)
    assert not problems and all(i.plan is not None for i in infos)
    assert all(i.sha256 == file_sha256(i.path) for i in infos)  # the manifest's hash, from the scan's read
    before = read_series(files, infos=infos)
    same_read(before, read_series(files))
    # the same slice again, with a longer header before its pixels
    _classic(files[1], SeriesInstanceUID=uid, ImagePositionPatient=[0, 0, 1], InstanceNumber=2,
             ImageComments="x" * 301, RescaleSlope="5")
    info1 = next(i for i in infos if i.path == files[1])
    assert not plan_is_current(files[1], info1.plan) and plan_is_current(files[0], infos[0].plan)
    after = read_series(files, infos=infos)
    same_read(after, read_series(files))
    assert np.array_equal(after[0][1], 2 * before[0][1] + 10)  # slope 5 instead of 2.5, intercept -10


def _classic(path, ts=ExplicitVRLittleEndian, **kw):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.Rows, ds.Columns = 4, 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, kw.pop("signed", 0)
    ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-10"
    for k, v in kw.items():
        setattr(ds, k, v)
    ds.PixelData = np.array([[0x0FFF, 0xF001, 0x0800], [1, 2, 3], [4, 5, 6], [0x1234, 7, 8]], np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=ts != ExplicitVRBigEndian)
    return path


@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_unused_high_bits_as_pydicom(tmp_path, signed, ts):
    p = _classic(tmp_path / "a.dcm", ts=ts, signed=signed, SeriesDescription="caf\u00e9", SpecificCharacterSet="ISO_IR 100")
    lite = read_lite(p)
    assert lite is not None
    ref = pydicom.dcmread(p)
    assert np.array_equal(lite.pixel_array, ref.pixel_array)
    assert lite.get("SeriesDescription") == ref.SeriesDescription == "caf\u00e9"
    assert lite.get("RescaleSlope") == 2.5 and lite.get("ImageOrientationPatient") == [1, 0, 0, 0, 1, 0]
    assert lite.Rows == 4 and "Columns" in lite and "EchoTime" not in lite


@pytest.mark.parametrize("case", ["truncated", "big_endian", "two_frames", "no_pixels", "preamble_only", "charset"])
def test_declines_what_it_does_not_handle(tmp_path, case):
    p = tmp_path / "a.dcm"
    if case == "big_endian":
        _classic(p, ts=ExplicitVRBigEndian)
    elif case == "two_frames":
        _classic(p, NumberOfFrames=2)
    elif case == "charset":
        _classic(p, SpecificCharacterSet="ISO 2022 IR 87")
    else:
        _classic(p)
        raw = p.read_bytes()
        if case == "truncated":
            p.write_bytes(raw[:-5])
        elif case == "no_pixels":
            ds = pydicom.dcmread(p)
            del ds.PixelData
            ds.save_as(p)
        elif case == "preamble_only":
            p.write_bytes(raw[:140])
    assert read_lite(p) is None


@pytest.mark.parametrize("case", ["no_bits_stored", "no_pixel_representation", "no_samples_per_pixel",
                                  "no_photometric_interpretation", "standard_element_as_un"])
def test_declines_headers_it_would_misread(tmp_path, case):
    """Files whose header the fast path would read differently from pydicom go to pydicom: the
    scan never raises on them, and whatever the reader makes of them is pydicom's answer."""
    p = _classic(tmp_path / "a.dcm")
    if case == "standard_element_as_un":
        # ImagePositionPatient re-encoded with VR UN, as a relay without a dictionary sends it
        raw = bytearray(p.read_bytes())
        i = raw.find(struct.pack("<HH", 0x0020, 0x0032), 132)
        n = struct.unpack_from("<H", raw, i + 6)[0]
        raw[i:i + 8 + n] = raw[i:i + 4] + b"UN\0\0" + struct.pack("<I", n) + raw[i + 8:i + 8 + n]
        p.write_bytes(bytes(raw))
    else:
        ds = pydicom.dcmread(p)
        delattr(ds, {"no_bits_stored": "BitsStored", "no_pixel_representation": "PixelRepresentation",
                     "no_samples_per_pixel": "SamplesPerPixel",
                     "no_photometric_interpretation": "PhotometricInterpretation"}[case])
        ds.save_as(p)
    assert read_lite(p) is None
    assert len(scan(p)[0]) + len(scan(p)[1]) == 1
    if case == "standard_element_as_un":
        fast, slow = both(pytest.MonkeyPatch(), lambda: read_series([p]))
        same_read(fast, slow)
        assert np.array_equal(fast[1][:3, 3], [0, 0, 0])


def test_private_element_relayed_as_un_reads_as_pydicom(tmp_path, monkeypatch):
    """An explicit-VR file whose private elements a relay re-encoded as UN (it did not know
    them): both paths resolve them through the private dictionary, e.g. Philips' scale slope."""
    p = _classic(tmp_path / "a.dcm", Manufacturer="Philips")
    ds = pydicom.dcmread(p)
    ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(0x0E, "UN", np.float32(10.0).tobytes())
    ds.save_as(p)
    assert read_lite(p) is not None
    fast, slow = both(monkeypatch, lambda: read_series([p]))
    same_read(fast, slow)
    assert fast[2]["philips_scale_slope"] == 10.0


def test_text_in_no_declared_charset_reads_as_pydicom(tmp_path):
    """A Latin-1 byte in a file that declares no character set (common in real exports), and
    invalid UTF-8 in one that declares ISO_IR 192: read as pydicom reads them, never an error
    raised later from a lazily decoded value."""
    p = _classic(tmp_path / "a.dcm", SeriesDescription="T1 axial")
    p.write_bytes(p.read_bytes().replace(b"T1 axial", b"T1 ax\xe9al"))
    q = _classic(tmp_path / "b.dcm", SeriesDescription="T1 axial", SpecificCharacterSet="ISO_IR 192")
    q.write_bytes(q.read_bytes().replace(b"T1 axial", b"T1 ax\xffal"))
    for f in (p, q):
        lite = read_lite(f)
        assert lite is not None
        with pytest.warns(UserWarning) if f == q else _no_warning():
            ref = pydicom.dcmread(f).SeriesDescription
        assert lite.get("SeriesDescription") == ref
        info, reason = _read_header(f, f.stat().st_size, f.stat().st_mtime_ns)
        assert info is not None and info.description == ref, reason


def test_bare_data_set_without_preamble(tmp_path):
    """A data set without the 128-byte preamble and "DICM" (older PACS exports) is read as
    dcm2niix and pydicom (force) read it, not ignored as "not DICOM"."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    full = _classic(tmp_path / "full.dcm")
    ds = pydicom.dcmread(full)
    del ds.file_meta
    bare = tmp_path / "bare.dcm"
    with open(bare, "wb") as fh:
        f = DicomFileLike(fh)
        f.is_little_endian, f.is_implicit_VR = True, True
        write_dataset(f, ds)
    infos, problems = scan(tmp_path)
    assert sorted(i.path.name for i in infos) == ["bare.dcm", "full.dcm"] and not problems
    a, aff, meta = read_series([bare])
    b, bff, _ = read_series([full])
    assert np.array_equal(a, b) and np.array_equal(aff, bff)
    # a text file that starts with other bytes is still not DICOM
    (tmp_path / "notes.txt").write_text("hello\n")
    assert "not DICOM" in _read_header(tmp_path / "notes.txt", 6)[1]


class _no_warning:  # noqa: N801 - a context manager used beside pytest.warns
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_known_elements_are_pydicom_s():
    """The fast path's own table of keywords, VRs and private VRs (kept so a plain classic file
    is read without importing pydicom) says what pydicom's dictionaries say."""
    from pydicom.datadict import dictionary_VR, private_dictionary_VR, tag_for_keyword
    from pydicom.uid import UID

    from ingest.dicomlite import _KNOWN, _KNOWN_PRIVATE
    from ingest.series import _MR_IMAGE_CLASSES

    for kw, (tag, vr) in _KNOWN.items():
        assert (tag_for_keyword(kw), dictionary_VR(tag)) == (tag, vr), kw
    for (creator, group, offset), vr in _KNOWN_PRIVATE.items():
        try:
            ref = private_dictionary_VR((group << 16) | 0x1000 | offset, creator)
        except KeyError:
            ref = "UN"
        assert vr == ref, (creator, hex(group), hex(offset))
    assert all("Image Storage" in UID(u).name for u in _MR_IMAGE_CLASSES)


def test_implicit_elements_outside_the_table_read_as_pydicom(tmp_path):
    """An implicit-VR file holds elements the fast path's table does not name: a sequence with
    items, an empty sequence, text and numbers. Their VRs are found when they are asked for (or,
    for the sequence, when its first Item shows), and the values are pydicom's."""
    from pydicom.sequence import Sequence

    from ingest.dicomlite import _KNOWN

    ref_item = Dataset()
    ref_item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ref_item.ReferencedSOPInstanceUID = generate_uid()
    extra = {"ReferencedImageSequence": Sequence([ref_item]), "ReferencedStudySequence": Sequence([]),
             "StudyDescription": "brain routine", "Laterality": "R", "SliceLocation": "12.5",
             "HighBit": 11, "ContrastBolusAgent": ""}
    assert not set(extra) & set(_KNOWN)
    p = _classic(tmp_path / "a.dcm", ts=ImplicitVRLittleEndian, **extra)
    lite, ref = read_lite(p), pydicom.dcmread(p)
    assert lite is not None
    for kw in extra:
        a, b = lite.get(kw), ref.get(kw)
        if kw.endswith("Sequence"):
            assert len(a) == len(b) and [i.get("ReferencedSOPInstanceUID") for i in a] == \
                [i.get("ReferencedSOPInstanceUID") for i in b], kw
        else:
            assert (a or None) == (b if b != "" else None), kw
        assert lite[kw].VR == ref[kw].VR, kw


def test_a_plain_tree_is_ingested_without_pydicom_or_nibabel(demo_tree, tmp_path):
    """The phantom's plain classic files and NIfTI ground truth take the fast paths throughout:
    pydicom and nibabel (which imports pydicom) cost 0.2 s of start-up in each process."""
    import subprocess
    import sys

    src = tmp_path / "data"
    src.mkdir()
    for site in ("site-A", "site-B"):
        (src / site).symlink_to(demo_tree / site)
    code = ("import sys; from pathlib import Path; from ingest.service import ingest; "
            f"ingest(Path({str(src)!r}), Path({str(tmp_path / 'raw')!r}), jobs=1); "
            "print(sorted(m for m in ('pydicom', 'nibabel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
