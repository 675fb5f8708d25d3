"""Synthetic contrasts back on the MRF geometry: DICOM series a PACS files beside the exam, or NIfTI.

Each output slice is built from the header of the MRF T1 map slice at the same position: the
same patient and study (StudyInstanceUID, so the PACS files it in the original exam), frame of
reference, ImagePositionPatient, ImageOrientationPatient, PixelSpacing and slice thickness; new
Series and SOP Instance UIDs; ImageType DERIVED\\SECONDARY\\SYNTHETIC; "SYNTHETIC" at the head of
SeriesDescription; the derivation (model, weights, source series) in DerivationDescription and
SourceImageSequence. Pixels are 12-bit (0-4095), the range the evaluation scores in.
"""

from __future__ import annotations

import datetime as _dt
import io
from pathlib import Path

import numpy as np

__all__ = ["DATA_RANGE", "LABELS", "dicom_series", "nifti_bytes", "to_stored"]

DATA_RANGE = 4095
LABELS = {"t1w": "T1w", "t2w": "T2w", "t1flair": "T1-FLAIR", "t2flair": "T2-FLAIR", "swi": "SWI"}
# copied unchanged from the source slice: who and which exam, and where the slice is
_COPY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
         "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
         "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator",
         "PatientPosition", "BodyPartExamined", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
         "SliceThickness", "SpacingBetweenSlices", "SliceLocation", "InstanceNumber", "AcquisitionNumber",
         "SpecificCharacterSet", "InstitutionName")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def to_stored(pred01: np.ndarray, brain: np.ndarray, inversion: dict) -> np.ndarray:
    """A model's [0, 1] prediction on the prepared grid -> uint16 0-4095 on the native MRF grid.
    Outside the brain mask is 0, as in the training targets."""
    from ingest.prepare.grid import to_native

    p = np.where(np.asarray(brain) > 0, np.clip(np.asarray(pred01, np.float32), 0.0, 1.0), 0.0)
    native, _ = to_native(p.astype(np.float32), inversion)
    return np.rint(np.clip(native, 0.0, 1.0) * DATA_RANGE).astype(np.uint16)


def _slice_index(ds, inv_affine: np.ndarray) -> int:
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient] + [1.0])
    return int(round(float((inv_affine @ ipp)[0])))


def dicom_series(stored: np.ndarray, affine: np.ndarray, sources: list[Path], t2_sources: list[Path],
                 contrast: str, card: dict, series_number: int) -> list[tuple[str, bytes]]:
    """One MR Image Storage file per slice of ``stored`` (Z, Y, X): [(file name, bytes)]."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    from ingest import __version__

    inv = np.linalg.inv(np.asarray(affine, float))
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    t2_at = {}
    for p in t2_sources:
        h = pydicom.dcmread(p, stop_before_pixels=True)
        if "ImagePositionPatient" in h:
            t2_at[_slice_index(h, inv)] = h
    by_slice = {}
    for h in heads:
        if "ImagePositionPatient" not in h or getattr(h, "NumberOfFrames", 1) not in (1, "1", None):
            raise ValueError("the MRF T1 map series is not classic single-frame DICOM: write-back needs one "
                             "header per slice")
        by_slice[_slice_index(h, inv)] = h
    z, rows, cols = stored.shape
    if sorted(by_slice) != list(range(z)):
        raise ValueError(f"the MRF T1 map series has slices {sorted(by_slice)[:4]}...; expected 0..{z - 1}")
    series_uid = generate_uid()
    now = _dt.datetime.now()
    label = LABELS.get(contrast, contrast)
    model_id = card.get("id", "")
    desc = f"SYNTHETIC {label} (qsnet {model_id})"[:64]
    derivation = (f"Synthesised by qsnet {__version__} from the MRF T1 and T2 maps of this study; model "
                  f"{model_id} ({card.get('architecture')}, {card.get('stage')}, weights sha256 "
                  f"{str(card.get('weights_sha256', ''))[:16]}). Not an acquired image.")[:1024]
    out = []
    for k in range(z):
        src = by_slice[k]
        ds = Dataset()
        for kw in _COPY:
            if kw in src:
                setattr(ds, kw, src.data_element(kw).value)
        sop = generate_uid()
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "MR"
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = desc
        ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC", label.upper().replace("-", "")]
        ds.DerivationDescription = derivation
        refs = []
        for h in (src, t2_at.get(k)):
            if h is not None and "SOPInstanceUID" in h:
                r = Dataset()
                r.ReferencedSOPClassUID = h.SOPClassUID
                r.ReferencedSOPInstanceUID = h.SOPInstanceUID
                refs.append(r)
        ds.SourceImageSequence = Sequence(refs)
        ds.Manufacturer = "qsnet"
        ds.ManufacturerModelName = f"QS-Net {card.get('architecture', '')}"[:64]
        ds.SoftwareVersions = __version__
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = ds.RepetitionTime = ds.EchoTrainLength = None
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(stored[k], "<u2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((f"IM{k + 1:04d}.dcm", buf.getvalue()))
    return out


def nifti_bytes(stored: np.ndarray, affine: np.ndarray) -> bytes:
    import tempfile

    from ingest.phantom.anatomy import save_nifti

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.nii.gz"
        save_nifti(p, stored, np.asarray(affine, float))
        return p.read_bytes()
