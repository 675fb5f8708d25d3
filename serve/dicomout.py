"""Synthetic contrasts back on the MRF geometry: DICOM series a PACS files beside the exam, or NIfTI.

Each output slice is built from the header of the MRF T1 map slice at the same position: the
same patient and study (StudyInstanceUID, so the PACS files it in the original exam), frame of
reference, ImagePositionPatient, ImageOrientationPatient, PixelSpacing and slice thickness; new
Series and SOP Instance UIDs, hashes of the source, the model and the pixels (a resent answer
files nothing twice); ImageType DERIVED\\SECONDARY\\SYNTHETIC; "SYNTHETIC" at the head of
SeriesDescription; the derivation (model, weights, source series) in DerivationDescription and
SourceImageSequence. Pixels are 12-bit (0-4095), the range the evaluation scores in.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import re
from pathlib import Path

import numpy as np

__all__ = ["DATA_RANGE", "LABELS", "check_uid_root", "dicom_series", "nifti_bytes", "source_headers", "to_stored"]

DATA_RANGE = 4095
LABELS = {"t1w": "T1w", "t2w": "T2w", "t1flair": "T1-FLAIR", "t2flair": "T2-FLAIR", "swi": "SWI"}
# copied unchanged from the MRF T1 map: who and which exam (one series: the same on every slice) ...
_COPY_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
               "PatientSex", "PatientAge", "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime",
               "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "InstitutionName",
               "FrameOfReferenceUID", "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined")
# Type 2 in the MR Image IOD: present, empty when the source has no value (an anonymiser that
# dropped them leaves the source non-conformant, not our series)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName", "PositionReferenceIndicator")
# ... and where each slice is, from the MRF slice at the same position
_COPY_SLICE = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
               "SpacingBetweenSlices", "SliceLocation", "InstanceNumber", "AcquisitionNumber")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def to_stored(pred01: np.ndarray, brain: np.ndarray, inversion: dict) -> np.ndarray:
    """A model's [0, 1] prediction on the prepared grid -> uint16 0-4095 on the native MRF grid.
    Outside the brain mask is 0, as in the training targets. ValueError for a prediction that
    is not finite (a diverged model), which clipped and cast would be a blank series."""
    from ingest.prepare.grid import to_native

    if not np.isfinite(pred01).all():
        raise ValueError("the prediction holds values that are not finite (NaN or inf); nothing was written")
    p = np.where(np.asarray(brain) > 0, np.clip(np.asarray(pred01, np.float32), 0.0, 1.0), 0.0)
    native, _ = to_native(p.astype(np.float32), inversion)
    return np.rint(np.clip(native, 0.0, 1.0) * DATA_RANGE).astype(np.uint16)


def _slice_index(ds, inv_affine: np.ndarray) -> int:
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient] + [1.0])
    return int(round(float((inv_affine @ ipp)[0])))


_UID_ROOT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\.")
_UID_ROOT_MAX = 40
# transfer syntaxes that lose information (JPEG baseline and extended, JPEG-LS near-lossless)
_LOSSY_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81")


def check_uid_root(root: str | None) -> str | None:
    """The organisation's UID root that new UIDs start with (``None``: pydicom's). PS3.5 9.1:
    digits in dot-separated components without leading zeros; it must end in "." and leave room
    for the unique part of a 64-character UID."""
    if root is None or root == "":
        return None
    root = str(root)
    # the rest of the 64 characters are the UID's own digits (random, or a hash: _derived_uid):
    # 24 of them (80 bits) keep a collision unlikely over a PACS's lifetime of SOP instances;
    # 10, after a 54-character root, gave one in 300,000 random UIDs
    if not _UID_ROOT.fullmatch(root) or len(root) > _UID_ROOT_MAX:
        raise ValueError(f"uid_root {root!r}: not a UID root (digits and dots, no leading zeros, ending in '.', "
                         f"at most {_UID_ROOT_MAX} characters): your organisation's registered root, such as '1.2.3.4.'")
    return root


def _derived_uid(root: str | None, *parts) -> str:
    """A UID under ``root`` (None: pydicom's) that is a hash of ``parts``: the same answer to the
    same exam gets the same UIDs, so a client's retry files nothing twice in the PACS (an
    instance it has already is a duplicate it drops), while any change of pixels, model or
    source makes new ones. 24 digits or more of the hash follow the root (check_uid_root)."""
    from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

    return generate_uid(root or PYDICOM_ROOT_UID, entropy_srcs=["|".join(str(p) for p in parts)])


def source_headers(affine: np.ndarray, n_slices: int, t1_files: list[Path],
                   t2_files: list[Path], uid_root: str | None = None) -> tuple[dict, dict]:
    """The MRF T1 and T2 map headers by slice index of ``affine``: read once per request, shared
    by every contrast's series. ValueError when the T1 map series cannot carry a write-back of
    ``n_slices`` slices."""
    from ingest.reader import dcmread_any

    inv = np.linalg.inv(np.asarray(affine, float))
    out = []
    for files in (t1_files, t2_files):
        at = {}
        for p in files:
            try:
                # the reader took these files, bare data sets (no preamble) among them
                h = dcmread_any(p, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a header it cannot read
                raise ValueError(f"{Path(p).name}: its header cannot be read again for the write-back "
                                 f"({type(exc).__name__})") from None
            if "ImagePositionPatient" in h and getattr(h, "NumberOfFrames", 1) in (1, "1", None):
                at[_slice_index(h, inv)] = h
        out.append(at)
    _check_slices(out[0], n_slices)
    if not all(h.get("StudyInstanceUID") for h in out[0].values()):
        # a series of a new study would not be filed with the exam, and a PACS refuses an
        # instance without one (Type 1): the client can take NIfTI instead
        raise ValueError("the MRF T1 map series has no StudyInstanceUID (an anonymiser removed it?): a synthetic "
                         "series could not be filed in its study")
    lacking = [h for h in out[0].values() if not h.get("FrameOfReferenceUID")]
    if lacking:
        # Type 1 for an image with a position: an anonymiser may have dropped it. One frame for
        # the request (another slice's, else a new one), so every synthetic series shares it.
        frame = next((h.FrameOfReferenceUID for h in out[0].values() if h.get("FrameOfReferenceUID")), None)
        frame = frame or _derived_uid(check_uid_root(uid_root), "qsnet-frame", out[0][0].get("StudyInstanceUID"),
                                      out[0][0].get("SeriesInstanceUID"))
        for h in lacking:
            h.FrameOfReferenceUID = frame
    return out[0], out[1]


def _check_slices(t1_at: dict, z: int) -> None:
    if sorted(t1_at) != list(range(z)):
        raise ValueError(f"the MRF T1 map series has {len(t1_at)} single-frame slices on its grid, expected {z}: "
                         "write-back needs one classic header per slice")


def _encode(ds, encodings) -> dict[int, bytes]:
    """Each element of ``ds`` as explicit VR little endian bytes, by tag."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    out = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        out[int(elem.tag)] = fp.getvalue()
    return out


def dicom_series(stored: np.ndarray, t1_at: dict, t2_at: dict, contrast: str, card: dict,
                 series_number: int, uid_root: str | None = None) -> list[tuple[str, bytes]]:
    """One MR Image Storage file per slice of ``stored`` (Z, Y, X): [(file name, bytes)].
    ``t1_at`` / ``t2_at``: :func:`source_headers`. The elements every slice shares are encoded
    once per series; a file is its meta group, then its own and the shared elements in tag order."""
    from pydicom.charset import convert_encodings
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.sequence import Sequence
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
    )

    from ingest import __version__

    uid_root = check_uid_root(uid_root)
    z, rows, cols = stored.shape
    _check_slices(t1_at, z)
    first = t1_at[0]
    now = _dt.datetime.now()
    label = LABELS.get(contrast, contrast)
    model_id = card.get("id", "")
    shared = Dataset()
    # Elements are copied whole: assigning their values would have pydicom validate them again,
    # and its warning about a non-conformant value (a birth date written 1965-11-09) quotes the
    # value into the replica's log
    for kw in _COPY_STUDY:
        if kw in first:
            shared.add(copy.deepcopy(first.data_element(kw)))
    for kw in _TYPE2:
        if kw not in shared:
            setattr(shared, kw, "")
    shared.SOPClassUID = MR_IMAGE_STORAGE
    pixels = hashlib.sha256(np.ascontiguousarray(stored, "<u2").tobytes()).hexdigest()
    shared.SeriesInstanceUID = _derived_uid(uid_root, "qsnet-series", first.get("StudyInstanceUID"),
                                            first.get("SeriesInstanceUID"), contrast, card.get("weights_sha256", ""),
                                            model_id, series_number, pixels)
    shared.Modality = "MR"
    shared.SeriesNumber = int(series_number)
    shared.SeriesDescription = f"SYNTHETIC {label} (qsnet {model_id})"[:64]
    shared.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC", label.upper().replace("-", "")]
    shared.DerivationDescription = (
        f"Synthesised by qsnet {__version__} from the MRF T1 and T2 maps of this study; model {model_id} "
        f"({card.get('architecture')}, {card.get('stage')}, weights sha256 {str(card.get('weights_sha256', ''))[:16]})."
        " Not an acquired image.")[:1024]
    shared.Manufacturer = "qsnet"
    shared.ManufacturerModelName = f"QS-Net {card.get('architecture', '')}"[:64]
    shared.SoftwareVersions = __version__
    shared.SeriesDate = shared.ContentDate = now.strftime("%Y%m%d")
    shared.SeriesTime = shared.ContentTime = now.strftime("%H%M%S")
    shared.ScanningSequence, shared.SequenceVariant, shared.ScanOptions = "RM", "NONE", ""
    # the MRF acquisition's own (Type 2: empty when the source has none; a 3D MRF is not 2D)
    shared.MRAcquisitionType = str(first.get("MRAcquisitionType") or "")
    shared.EchoTime = shared.RepetitionTime = shared.EchoTrainLength = None
    shared.SamplesPerPixel = 1
    shared.PhotometricInterpretation = "MONOCHROME2"
    shared.Rows, shared.Columns = rows, cols
    shared.BitsAllocated, shared.BitsStored, shared.HighBit, shared.PixelRepresentation = 16, 12, 11, 0
    shared.RescaleIntercept, shared.RescaleSlope, shared.RescaleType = 0, 1, "US"
    shared.WindowCenter, shared.WindowWidth = 2048, 4096
    shared.BurnedInAnnotation = "NO"
    # lossy once, lossy for good (PS3.3 C.7.6.1.1.5): maps that came JPEG-compressed pass it on
    lossy = any(str(h.get("LossyImageCompression", "")) == "01"
                or str(h.get("file_meta", Dataset()).get("TransferSyntaxUID", "")) in _LOSSY_SYNTAXES
                for at in (t1_at, t2_at) for h in at.values())
    shared.LossyImageCompression = "01" if lossy else "00"
    encodings = convert_encodings(first.get("SpecificCharacterSet") or "ISO_IR 6")
    common = _encode(shared, encodings)
    out = []
    for k in range(z):
        src = t1_at[k]
        ds = Dataset()
        for kw in _COPY_SLICE:
            if kw in src:
                ds.add(copy.deepcopy(src.data_element(kw)))
        ds.SOPInstanceUID = _derived_uid(uid_root, "qsnet-sop", shared.SeriesInstanceUID, k)
        refs = []
        for h in (src, t2_at.get(k)):
            # the scan accepts a SOP Class UID given only in the file meta, or none at all (a bare
            # data set); a reference needs both UIDs (Type 1), so a source without a class has none
            cls = h.get("SOPClassUID") or h.get("file_meta", Dataset()).get("MediaStorageSOPClassUID") \
                if h is not None else None
            if cls and "SOPInstanceUID" in h:
                r = Dataset()
                r.ReferencedSOPClassUID = cls
                r.ReferencedSOPInstanceUID = h.SOPInstanceUID
                refs.append(r)
        ds.SourceImageSequence = Sequence(refs)
        ds.PixelData = np.ascontiguousarray(stored[k], "<u2").tobytes()
        ds["PixelData"].VR = "OW"
        elems = {**common, **_encode(ds, encodings)}
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta)
        out.append((f"IM{k + 1:04d}.dcm", fp.getvalue() + b"".join(elems[t] for t in sorted(elems))))
    return out


def nifti_bytes(stored: np.ndarray, affine: np.ndarray, forms: dict | None = None) -> bytes:
    """``stored`` (Z, Y, X) as a .nii.gz; ``forms``: the upload's own sform/qform (a NIfTI upload)."""
    import tempfile

    from ingest.nifti import save_nifti

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.nii.gz"
        save_nifti(p, stored, np.asarray(affine, float), forms)
        return p.read_bytes()
