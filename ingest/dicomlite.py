"""A fast path for the commonest DICOM file: classic single-frame, uncompressed little endian.

pydicom builds a Python object per element and converts values through several layers; on
a folder of small MR slices that costs more per file than dcm2niix's whole conversion. This
module parses such a file in one pass over its bytes (element headers only; values are
converted when asked for) and offers the part of pydicom's ``Dataset`` interface that
:mod:`ingest.reader` and :mod:`ingest.series` use: ``get``, ``in``, attribute access,
``get_item``, ``private_block``, ``file_meta`` and ``pixel_array``, with the same value types
(float for DS, int for IS, str for text, lists for several values, a list of datasets for a
sequence, an element with ``.value`` when asked by tag).

It declines (returns None) anything outside that case, and then the caller reads the file with
pydicom as before: no 'DICM' preamble, a transfer syntax other than implicit or explicit VR
little endian, a character set other than ASCII, Latin-1 or UTF-8, functional groups (enhanced
multi-frame), more than one frame, mosaics, float pixel data, colour, missing or short pixel
data, anything malformed. So every unusual or broken file still goes through pydicom, with its
messages; tests check that both paths give identical arrays, geometry and metadata.
"""

from __future__ import annotations

import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["read_lite", "LiteDataset", "native_pixels"]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PIXEL_DATA = 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_LONG_VR_NAMES = {v.decode() for v in _LONG_VRS}
_VR_NAMES = {v.encode(): v for v in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
).split()}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MULTI_TEXT = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"}
_STRIP_BOTH = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}
_NUMERIC = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
# The default repertoire as pydicom reads it: Latin-1, so a stray accented byte in a file that
# declares no character set decodes (real exports have them) instead of failing
_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_FG = (0x52009229, 0x52009230)  # Shared / Per-frame Functional Groups Sequence
_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEAD = struct.Struct("<HHI").unpack_from
_U32 = struct.Struct("<I").unpack_from
_MISSING = object()
_ITEM_HEAD = 0xE000FFFE  # an Item tag (FFFE,E000) read as one little-endian 32-bit word
_AMBIGUOUS = {"US or SS": "US", "OB or OW": "OW", "US or OW": "US", "US or SS or OW": "US"}

# The standard elements that the reader, the scan and de-identification ask for, with their
# dictionary VRs. With them here a plain classic file is read without importing pydicom, whose
# import (0.15 s with its pixel handlers) was a tenth of a demo ingest's wall time, spent before
# the workers fork. Any other element is looked up in pydicom's dictionary when it is asked for;
# tests/test_ingest_fastpath.py checks these against that dictionary.
_KNOWN: dict[str, tuple[int, str]] = {
    "MediaStorageSOPClassUID": (0x00020002, "UI"), "TransferSyntaxUID": (0x00020010, "UI"),
    "SpecificCharacterSet": (0x00080005, "CS"), "ImageType": (0x00080008, "CS"),
    "SOPClassUID": (0x00080016, "UI"), "SOPInstanceUID": (0x00080018, "UI"),
    "AcquisitionDate": (0x00080022, "DA"), "AcquisitionDateTime": (0x0008002A, "DT"),
    "AcquisitionTime": (0x00080032, "TM"), "AccessionNumber": (0x00080050, "SH"),
    "Modality": (0x00080060, "CS"), "Manufacturer": (0x00080070, "LO"),
    "InstitutionName": (0x00080080, "LO"), "InstitutionAddress": (0x00080081, "ST"),
    "ReferringPhysicianName": (0x00080090, "PN"), "CodeValue": (0x00080100, "SH"),
    "SeriesDescription": (0x0008103E, "LO"), "InstitutionalDepartmentName": (0x00081040, "LO"),
    "PhysiciansOfRecord": (0x00081048, "PN"), "PerformingPhysicianName": (0x00081050, "PN"),
    "NameOfPhysiciansReadingStudy": (0x00081060, "PN"), "OperatorsName": (0x00081070, "PN"),
    "ManufacturerModelName": (0x00081090, "LO"), "FrameType": (0x00089007, "CS"),
    "ComplexImageComponent": (0x00089208, "CS"), "PatientName": (0x00100010, "PN"),
    "PatientID": (0x00100020, "LO"), "PatientBirthDate": (0x00100030, "DA"),
    "OtherPatientIDs": (0x00101000, "LO"), "OtherPatientNames": (0x00101001, "PN"),
    "PatientBirthName": (0x00101005, "PN"), "PatientMotherBirthName": (0x00101060, "PN"),
    "ScanningSequence": (0x00180020, "CS"), "SequenceVariant": (0x00180021, "CS"),
    "ScanOptions": (0x00180022, "CS"), "MRAcquisitionType": (0x00180023, "CS"),
    "SequenceName": (0x00180024, "SH"), "SliceThickness": (0x00180050, "DS"),
    "RepetitionTime": (0x00180080, "DS"), "EchoTime": (0x00180081, "DS"),
    "InversionTime": (0x00180082, "DS"), "NumberOfAverages": (0x00180083, "DS"),
    "ImagingFrequency": (0x00180084, "DS"), "EchoNumbers": (0x00180086, "IS"),
    "MagneticFieldStrength": (0x00180087, "DS"), "SpacingBetweenSlices": (0x00180088, "DS"),
    "EchoTrainLength": (0x00180091, "IS"), "PixelBandwidth": (0x00180095, "DS"),
    "SoftwareVersions": (0x00181020, "LO"), "ProtocolName": (0x00181030, "LO"),
    "ReceiveCoilName": (0x00181250, "SH"), "FlipAngle": (0x00181314, "DS"),
    "PatientPosition": (0x00185100, "CS"), "PulseSequenceName": (0x00189005, "SH"),
    "FrameAcquisitionDateTime": (0x00189074, "DT"), "InversionTimes": (0x00189079, "FD"),
    "EffectiveEchoTime": (0x00189082, "FD"), "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"), "SeriesNumber": (0x00200011, "IS"),
    "AcquisitionNumber": (0x00200012, "IS"), "InstanceNumber": (0x00200013, "IS"),
    "ImagePositionPatient": (0x00200032, "DS"), "ImageOrientationPatient": (0x00200037, "DS"),
    "TemporalPositionIdentifier": (0x00200100, "IS"), "ImagesInAcquisition": (0x00201002, "IS"),
    "FrameContentSequence": (0x00209111, "SQ"), "PlanePositionSequence": (0x00209113, "SQ"),
    "PlaneOrientationSequence": (0x00209116, "SQ"), "TemporalPositionIndex": (0x00209128, "UL"),
    "FrameAcquisitionNumber": (0x00209156, "US"), "SamplesPerPixel": (0x00280002, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"), "NumberOfFrames": (0x00280008, "IS"),
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "PixelSpacing": (0x00280030, "DS"),
    "BitsAllocated": (0x00280100, "US"), "BitsStored": (0x00280101, "US"),
    "PixelRepresentation": (0x00280103, "US"), "RescaleIntercept": (0x00281052, "DS"),
    "RescaleSlope": (0x00281053, "DS"), "RescaleType": (0x00281054, "LO"),
    "PixelMeasuresSequence": (0x00289110, "SQ"), "PixelValueTransformationSequence": (0x00289145, "SQ"),
    "MeasurementUnitsCodeSequence": (0x004008EA, "SQ"),
    "RealWorldValueMappingSequence": (0x00409096, "SQ"), "RealWorldValueIntercept": (0x00409224, "FD"),
    "RealWorldValueSlope": (0x00409225, "FD"), "SharedFunctionalGroupsSequence": (0x52009229, "SQ"),
    "PerFrameFunctionalGroupsSequence": (0x52009230, "SQ"), "FloatPixelData": (0x7FE00008, "OF"),
    "DoubleFloatPixelData": (0x7FE00009, "OD"), "PixelData": (0x7FE00010, "OB or OW"),
}
_KNOWN_VR = {tag: vr for tag, vr in _KNOWN.values()}
# (creator, group, element offset) -> VR of the private elements the reader reads ("UN": not in
# pydicom's private dictionary, so raw bytes there too)
_KNOWN_PRIVATE: dict[tuple[str, int, int], str] = {
    ("GEMS_ACQU_01", 0x0019, 0x9C): "LO", ("GEMS_ACQU_01", 0x0019, 0x9E): "LO",
    ("GEMS_ACQU_01", 0x0019, 0xB3): "DS", ("GEMS_RELA_01", 0x0021, 0x4F): "SS",
    ("GEMS_PARM_01", 0x0043, 0x2F): "SS", ("SIEMENS MR HEADER", 0x0019, 0x0A): "US",
    ("SIEMENS CSA HEADER", 0x0029, 0x10): "OB", ("SIEMENS CSA HEADER", 0x0029, 0x20): "OB",
    ("Image Private Header", 0x0065, 0x50): "UN", ("Image Private Header", 0x0065, 0x51): "UN",
    ("Philips MR Imaging DD 001", 0x2005, 0x0E): "FL",
}


class _Decline(Exception):
    """Not the simple case: read this file with pydicom."""


@lru_cache(maxsize=None)
def _tag(key) -> int | None:
    if isinstance(key, str):
        known = _KNOWN.get(key)
        if known is not None:
            return known[0]
        from pydicom.datadict import tag_for_keyword

        return tag_for_keyword(key)
    if isinstance(key, tuple):
        return (key[0] << 16) | key[1]
    return int(key)


@lru_cache(maxsize=None)
def _implicit_vr(tag: int) -> str | None:
    """The VR of an implicit-VR element as far as it is known without pydicom: None for a
    standard element outside :data:`_KNOWN` (see :func:`_dictionary_vr`)."""
    if (tag & 0xFFFF) == 0 and tag >> 16 != 0x0002:
        return "UL"  # group length
    if (tag >> 16) & 1:
        return "LO" if 0x0010 <= (tag & 0xFFFF) <= 0x00FF else "UN"  # private creator / element
    vr = _KNOWN_VR.get(tag)
    return None if vr is None else _AMBIGUOUS.get(vr, vr)


@lru_cache(maxsize=None)
def _dictionary_vr(tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    # ambiguous VRs: these files are little endian with pixel representation known later;
    # the elements we read with such VRs (pixel data) are handled as raw bytes anyway
    return _AMBIGUOUS.get(vr, vr)


class _Element:
    __slots__ = ("tag", "VR", "length", "_ds")

    def __init__(self, tag: int, vr: str, length: int, ds: "LiteDataset"):
        self.tag, self.VR, self.length, self._ds = tag, vr, length, ds

    @property
    def value(self):
        return self._ds._value(self.tag)


class _PrivateBlock:
    def __init__(self, ds: "LiteDataset", base: int):
        self._ds, self._base = ds, base

    def __getitem__(self, offset: int) -> _Element:
        tag = self._base | (offset & 0xFF)
        if tag not in self._ds._elems:
            raise KeyError(tag)
        return self._ds._element(tag)


class LiteDataset:
    def __init__(self, buf, elems: dict, encoding: str, file_meta: "LiteDataset | None" = None,
                 implicit: bool = False):
        self._buf = buf
        self._implicit = implicit
        self._elems = elems           # tag -> (VR, value offset, length) or (VR "SQ", items, length)
        self._enc = encoding
        self._cache: dict[int, object] = {}
        self._creators: dict[tuple[int, str], int] | None = None
        self.file_meta = file_meta

    # -- pydicom Dataset interface (the part our reader uses)
    def __contains__(self, key) -> bool:
        t = _tag(key)
        return t is not None and t in self._elems

    def get(self, key, default=None):
        t = _tag(key)
        if t is None or t not in self._elems:
            return default
        if not isinstance(key, str):  # by tag: pydicom gives the element
            return self._element(t)
        # the reader asks for some values several times per file (a third of the scan's calls)
        v = self._cache.get(t, _MISSING)
        return self._value(t) if v is _MISSING else v

    def __getattr__(self, name: str):
        if name.startswith("_") or not name[:1].isupper():
            raise AttributeError(name)
        t = _tag(name)
        if t is None or t not in self._elems:
            raise AttributeError(name)
        return self._value(t)

    def __getitem__(self, key):
        t = _tag(key)
        if t is None or t not in self._elems:
            raise KeyError(key)
        return self._element(t)

    def get_item(self, key) -> _Element:
        return self[key]

    def private_block(self, group: int, creator: str) -> _PrivateBlock:
        # the creators of every private group, found once per file: the reader looks up
        # several private elements of each GE or Siemens slice, most of them absent
        if self._creators is None:
            self._creators = {}
            for t in self._elems:
                if (t >> 16) & 1 and 0x10 <= (t & 0xFFFF) <= 0xFF:
                    self._creators.setdefault((t >> 16, str(self._value(t) or "").strip()), t)
        t = self._creators.get((group, creator))
        if t is None:
            raise KeyError(f"private creator {creator!r} not in group {group:04X}")
        return _PrivateBlock(self, (group << 16) | ((t & 0xFF) << 8))

    def pixel_layout(self) -> tuple[int, int, int, int, int, bool]:
        """(offset of the pixel bytes in the file, rows, columns, bits allocated, bits stored,
        signed): all :func:`native_pixels` needs to decode them."""
        rows, cols = int(self._value(0x00280010)), int(self._value(0x00280011))
        bits = int(self._value(0x00280100))
        stored = int(self.get("BitsStored") or bits)
        signed = int(self.get("PixelRepresentation") or 0) == 1
        return self._elems[PIXEL_DATA][1], rows, cols, bits, stored, signed

    @property
    def pixel_array(self) -> np.ndarray:
        off, rows, cols, bits, stored, signed = self.pixel_layout()
        return native_pixels(self._buf, off, rows, cols, bits, stored, signed)

    # -- internals
    def _element(self, t: int) -> _Element:
        e = self._elems[t]
        if e[0] is None:
            e = self._resolve(t)
        return _Element(t, e[0], e[2], self)

    def _resolve(self, t: int) -> tuple:
        """An implicit-VR element the parser stored without its VR, now that it is asked for.
        Its value does not start with an Item (the parser resolved those), so as a sequence it
        can only be empty; a non-empty one is malformed and stays raw bytes."""
        _, off, length = self._elems[t]
        vr = _dictionary_vr(t)
        e = self._elems[t] = ("SQ", [], 0) if vr == "SQ" and length == 0 else \
            ("UN" if vr == "SQ" else vr, off, length)
        return e

    def _value(self, t: int):
        if t in self._cache:
            return self._cache[t]
        vr, off, length = self._elems[t]
        if vr is None:
            vr, off, length = self._resolve(t)
        if t == PIXEL_DATA:
            return memoryview(self._buf)[off:off + length]  # no copy: only its length is asked for
        # private elements arrive as UN in implicit files, and in explicit ones relayed by a PACS
        # that did not know them; pydicom resolves both through its private dictionary
        if vr == "UN" and (t >> 16) & 1:
            vr = self._private_vr(t)
        v = self._convert(vr, off, length)
        self._cache[t] = v
        return v

    def _private_vr(self, t: int) -> str:
        """VR of a private element stored as UN, from pydicom's private dictionary (as pydicom
        does), else UN (raw bytes)."""
        creator_tag = (t & 0xFFFF0000) | ((t >> 8) & 0xFF)
        if creator_tag not in self._elems or creator_tag == t:
            return "UN"
        try:
            creator = str(self._value(creator_tag) or "").strip()
            vr = _KNOWN_PRIVATE.get((creator, t >> 16, t & 0xFF))
            if vr is None:
                from pydicom.datadict import private_dictionary_VR

                vr = private_dictionary_VR(t, creator)
        except (KeyError, TypeError):
            return "UN"
        return vr if vr in _NUMERIC or vr in _MULTI_TEXT or vr in ("LT", "ST", "UT", "SQ") else "UN"

    def _convert(self, vr: str, off, length: int):
        if vr == "SQ":
            return off  # the parsed items
        raw = self._buf[off:off + length]
        if vr in _NUMERIC:
            fmt = _NUMERIC[vr]
            n = length // struct.calcsize(fmt)
            if n == 0:
                return None
            vals = struct.unpack_from(f"<{n}{fmt}", raw)
            return vals[0] if n == 1 else list(vals)
        if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"):
            return bytes(raw)
        # invalid UTF-8 becomes U+FFFD, as pydicom falls back to; values are decoded lazily, after
        # read_lite has returned, so a decode error here would escape every caller's handling
        text = bytes(raw).decode(self._enc if vr in ("LO", "SH", "PN", "LT", "ST", "UT", "UC") else "latin-1",
                                 errors="replace")
        if vr in ("LT", "ST", "UT", "UR"):
            return text.rstrip("\0 ")
        parts = text.split("\\") if vr in _MULTI_TEXT else [text]
        parts = [p.strip("\0 ") if vr in _STRIP_BOTH else p.rstrip("\0 ") for p in parts]
        if vr in ("DS", "IS"):
            if len(parts) == 1 and parts[0] == "":
                return None
            conv = []
            for p in parts:
                try:
                    conv.append(float(p) if vr == "DS" else int(p))
                except ValueError:
                    conv.append(p)  # malformed number: the text, which the reader's parsers refuse
            return conv[0] if len(conv) == 1 else conv
        if len(parts) == 1:
            return parts[0]
        return parts


def native_pixels(buf, off: int, rows: int, cols: int, bits: int, stored: int, signed: bool) -> np.ndarray:
    """One frame of native little-endian pixel data at ``buf[off:]``, as pydicom decodes it."""
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    arr = np.frombuffer(buf, dtype=dtype, count=rows * cols, offset=off).reshape(rows, cols)
    if stored < bits:  # as pydicom: mask the unused high bits, sign-extend from the high bit
        if signed:
            shift = bits - stored
            arr = (arr << shift) >> shift
        else:
            arr = arr & ((1 << stored) - 1)
    return arr


def _parse(buf, pos: int, end: int, explicit: bool, top: bool, encoding: str, nested: int = 0):
    """Elements from ``pos`` to ``end`` (or a delimiter): (elements, position after)."""
    elems: dict[int, tuple] = {}
    nbuf = len(buf)
    # one unpack per element header (tag, VR and short length, or tag and length): this loop
    # runs for every element of every file of a tree
    while pos < end:
        if pos + 8 > nbuf:
            raise _Decline
        if explicit:
            group, elem, vrb, length = _EXPLICIT_HEAD(buf, pos)
        else:
            group, elem, length = _IMPLICIT_HEAD(buf, pos)
        tag = (group << 16) | elem
        if tag in (_ITEM_END, _SEQ_END):
            return elems, pos  # caller handles the delimiter
        if explicit:
            vr = _VR_NAMES.get(vrb)
            # a standard element sent as UN (a converter that lost its dictionary): pydicom
            # reads it with its dictionary VR; here its value would stay raw bytes
            if vr is None or (vr == "UN" and not group & 1):
                raise _Decline
            if vr in _LONG_VR_NAMES:
                if pos + 12 > nbuf:
                    raise _Decline
                length = _U32(buf, pos + 8)[0]
                pos += 12
            else:
                pos += 8
        else:
            pos += 8
            vr = _implicit_vr(tag)
            # an element outside the table keeps no VR until it is asked for, unless its value
            # opens with an Item: a sequence, parsed now like every other
            if vr is None and length != _UNDEFINED and length >= 8 and pos + 4 <= nbuf \
                    and _U32(buf, pos)[0] == _ITEM_HEAD:
                vr = _dictionary_vr(tag)
        if tag == PIXEL_DATA and top:
            if length == _UNDEFINED or pos + length > nbuf:
                raise _Decline  # encapsulated or truncated: pydicom says which
            elems[tag] = ("OW", pos, length)
            return elems, pos + length
        if vr == "SQ" or (length == _UNDEFINED and vr in ("UN", None) and not explicit):
            items, pos = _parse_items(buf, pos, length, explicit, encoding, nested)
            elems[tag] = ("SQ", items, length)
            continue
        if length == _UNDEFINED or pos + length > nbuf:
            raise _Decline
        elems[tag] = (vr, pos, length)
        pos += length
    return elems, pos


def _parse_items(buf, pos: int, length: int, explicit: bool, encoding: str, nested: int):
    if nested > 8:
        raise _Decline
    end = len(buf) if length == _UNDEFINED else pos + length
    if end > len(buf):
        raise _Decline
    items = []
    unpack = struct.unpack_from
    while pos < end:
        if pos + 8 > len(buf):
            raise _Decline
        group, elem, ilen = unpack("<HHI", buf, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            return items, pos
        if tag != _ITEM:
            raise _Decline
        iend = len(buf) if ilen == _UNDEFINED else pos + ilen
        sub, pos = _parse(buf, pos, iend, explicit, False, encoding, nested + 1)
        if ilen == _UNDEFINED:
            if pos + 8 > len(buf) or unpack("<HH", buf, pos) != (0xFFFE, 0xE00D):
                raise _Decline
            pos += 8
        items.append(LiteDataset(buf, sub, encoding, implicit=not explicit))
    if length == _UNDEFINED:
        raise _Decline  # no sequence delimiter before the end of the file
    return items, pos


def enabled() -> bool:
    """QSNET_DICOM_FASTPATH=0 sends every file through pydicom (an escape hatch, and the
    reference the equivalence tests compare with)."""
    return os.environ.get("QSNET_DICOM_FASTPATH", "1") != "0"


def read_lite(path: Path | str, buf: bytes | None = None, max_size: int = 64 << 20) -> LiteDataset | None:
    """The dataset of a simple classic file (see the module docstring), else None."""
    if not enabled():
        return None
    try:
        if buf is None and os.path.getsize(path) > max_size:
            return None
        if buf is None:
            with open(path, "rb") as fh:
                buf = fh.read()
        return _read(bytes(buf))
    except (_Decline, struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _read(buf) -> LiteDataset | None:
    if len(buf) < 144 or buf[128:132] != b"DICM":
        return None
    # file meta: always explicit VR little endian, group 0002 only
    pos, meta = 132, {}
    while pos + 8 <= len(buf) and struct.unpack_from("<H", buf, pos)[0] == 0x0002:
        m, pos = _parse(buf, pos, pos + 1, True, False, "ascii")
        meta.update(m)
    file_meta = LiteDataset(buf, meta, "ascii")
    ts = str(file_meta.get("TransferSyntaxUID") or "").strip("\0 ")
    if ts not in (IMPLICIT_LE, EXPLICIT_LE):
        return None
    elems, _ = _parse(buf, pos, len(buf), ts == EXPLICIT_LE, True, "latin-1")
    ds = LiteDataset(buf, elems, "ascii", file_meta, implicit=ts == IMPLICIT_LE)
    cs = ds.get("SpecificCharacterSet")
    cs = "" if cs is None else (cs if isinstance(cs, str) else "\\".join(cs)).strip()
    if cs not in _CHARSETS:
        return None
    ds._enc = _CHARSETS[cs]
    for items in _walk_sequences(elems):
        for item in items:
            item._enc = ds._enc
    if PIXEL_DATA not in elems or any(t in elems for t in _FG):
        return None
    itype = ds.get("ImageType")
    itypes = [itype] if isinstance(itype, str) else (itype or [])
    if any(str(t).strip().upper() == "MOSAIC" for t in itypes):
        return None
    rows, cols, bits = ds.get("Rows"), ds.get("Columns"), ds.get("BitsAllocated")
    frames = ds.get("NumberOfFrames")
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1 or bits not in (8, 16, 32):
        return None
    # both are Type 1 in the Image Pixel module: pydicom refuses a file without them, with its reason
    # greyscale only: a PALETTE COLOR file also has one sample a pixel, and its values are indices
    if frames not in (None, 1) or ds.get("SamplesPerPixel") != 1 or \
            ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    stored = ds.get("BitsStored")
    # pydicom cannot decode pixels without these: it says so, per file
    if not isinstance(stored, int) or not 1 <= stored <= bits or ds.get("PixelRepresentation") not in (0, 1):
        return None
    _, off, length = elems[PIXEL_DATA]
    need = rows * cols * (bits // 8)
    if length < need or length >= 2 * need:   # the reader's checks say what is wrong with it
        return None
    return ds


def _walk_sequences(elems: dict):
    for vr, val, _ in elems.values():
        if vr == "SQ":
            yield val
            for item in val:
                yield from _walk_sequences(item._elems)
