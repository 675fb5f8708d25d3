"""One uploaded exam, from request body to model input, without Ray (the app runs it in a thread).

The body is a zip holding a site's MRF T1 and T2 maps as DICOM (one exam), a NIfTI pair
(``t1`` and ``t2`` each a word of one file's name, e.g. ``mrf_t1.nii.gz``; maps in ms) or a raw
exam store as ``qsnet ingest`` writes it. DICOM goes through ingest itself (:func:`ingest.service.ingest_exam`: the same
series grouping, role rules, reader, checks and de-identified store), and the maps through
prepare's registration-free path (:func:`ingest.prepare.service.prepare_inputs`), so a served
exam gives the model exactly the input the offline pipeline would.

Every way an upload can be wrong raises :class:`RequestError` with an HTTP status and a code a
client can act on; nothing here logs header values (names, IDs, dates stay in the request).
"""

from __future__ import annotations

import io
import lzma
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ingest import first_line

__all__ = ["Exam", "Limits", "RequestError", "model_input", "read_exam", "unpack"]


class RequestError(ValueError):
    """A request the service refuses: ``status`` (4xx), ``code`` (stable, for clients), message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    """What one request may hold. The zip limits are checked on the bytes actually inflated,
    not on the sizes the zip claims (a zip bomb lies about them)."""

    max_request_bytes: int = 256 << 20
    max_entries: int = 10_000
    max_unpacked_bytes: int = 2 << 30
    max_ratio: float = 200.0           # inflated / compressed, per entry and overall
    # voxels per map as its header declares them: a store's metadata or a .nii.gz (compressed a
    # second time inside the zip) can declare GBs from a few hundred bytes. 2^26 is 512 x 512 x 256.
    max_map_voxels: int = 1 << 26
    idle_timeout_s: float = 60.0       # a body that sends nothing for this long is dropped (408)
    # Exams an ingress replica takes in at once (bodies held in memory while they are read and
    # worked on). Beyond them a request waits up to queue_timeout_s for a turn, then gets 503
    # with Retry-After. The replica's other slots stay free for /healthz and /readyz: slow
    # uploads must not make a liveness probe fail and the replica be restarted under them.
    max_concurrent_uploads: int = 16
    queue_timeout_s: float = 30.0

    @classmethod
    def from_dict(cls, d: dict | None) -> Limits:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown request limit(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        out = cls(**d)
        for name in cls.__dataclass_fields__:
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"request limit {name} must be a positive number, got {v!r}")
        if not isinstance(out.max_concurrent_uploads, int):
            raise ValueError(f"request limit max_concurrent_uploads must be a whole number, "
                             f"got {out.max_concurrent_uploads!r}")
        return out


@dataclass
class Exam:
    """The maps of one exam on their native grid and what the answer needs from the upload."""

    kind: str                                  # dicom | nifti | zarr
    t1: np.ndarray
    t2: np.ndarray
    affine: np.ndarray                         # (z, y, x) -> LPS of mrf_t1
    t2_affine: np.ndarray
    site: str | None = None                    # a known site whose rules recognised the maps
    sources: dict = field(default_factory=dict)  # role -> [Path] of the DICOM files (dicom only)
    notes: list = field(default_factory=list)    # ignored files and why, for the answer's record
    nifti_forms: dict | None = None            # the upload's sform/qform and codes (nifti only)


# ----------------------------------------------------------------------------- unpacking

def _safe_name(name: str) -> PurePosixPath | None:
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    p = PurePosixPath(name)
    if any(part in ("..", "") for part in p.parts) or p.is_absolute():
        return None
    return p


def unpack(body: bytes, dest: Path, limits: Limits = Limits()) -> Path:
    """Extract the zip ``body`` under ``dest``; refuse traversal, links, encryption and bombs."""
    if len(body) > limits.max_request_bytes:
        raise RequestError(413, "request_too_large", f"the body is {len(body)} bytes; the limit is "
                           f"{limits.max_request_bytes}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise RequestError(400, "not_a_zip", "the body is not a zip archive: send the exam's files zipped "
                           "(DICOM, a NIfTI pair or an exam store)") from None
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > limits.max_entries:
        raise RequestError(413, "zip_too_many_entries", f"the zip holds {len(infos)} files; the limit is "
                           f"{limits.max_entries}")
    if not infos:
        raise RequestError(422, "empty_zip", "the zip holds no file")
    total = 0
    packed = sum(max(i.compress_size, 1) for i in infos)
    dest.mkdir(parents=True, exist_ok=True)
    seen: set = set()
    for info in infos:
        rel = _safe_name(info.filename)
        if rel is None:
            raise RequestError(400, "unsafe_zip_path", f"zip entry {info.filename!r}: absolute or parent-relative "
                               "path; entries must stay inside the archive")
        if rel in seen:  # the second copy would replace the first, which slice is the exam's unsaid
            raise RequestError(400, "duplicate_zip_entry", f"zip entry {info.filename!r} is in the zip twice: "
                               "zip the exam's files again")
        seen.add(rel)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise RequestError(400, "unsafe_zip_path", f"zip entry {info.filename!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise RequestError(400, "encrypted_zip", f"zip entry {info.filename!r} is encrypted")
        out = dest.joinpath(*rel.parts)
        written = 0
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as fh:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    total += len(chunk)
                    if total > limits.max_unpacked_bytes:
                        raise RequestError(413, "zip_bomb", f"the zip inflates past {limits.max_unpacked_bytes} "
                                           "bytes; refused")
                    if written > 1 << 20 and written > limits.max_ratio * max(info.compress_size, 1):
                        raise RequestError(413, "zip_bomb", f"zip entry {info.filename!r} inflates more than "
                                           f"{limits.max_ratio:g} times its packed size; refused")
                    # many small entries each under the per-entry check: stop at the overall ratio
                    # while writing, not after every byte is on disk
                    if total > 1 << 20 and total > limits.max_ratio * packed:
                        raise RequestError(413, "zip_bomb", f"the zip inflates more than {limits.max_ratio:g} "
                                           "times its size; refused")
                    fh.write(chunk)
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, zlib.error, lzma.LZMAError) as exc:
            raise RequestError(400, "bad_zip", f"zip entry {info.filename!r}: cannot be read ({exc})") from None
        except OSError as exc:  # a name too long for the file system, a file and a folder of one name
            raise RequestError(400, "bad_zip", f"zip entry {info.filename!r}: cannot be unpacked "
                               f"({exc.strerror or exc})") from None
    if total > 1 << 20 and total > limits.max_ratio * packed:
        raise RequestError(413, "zip_bomb", f"the zip inflates {total / packed:.0f} times its size; refused")
    return dest


# ----------------------------------------------------------------------------- reading

def _kind(root: Path) -> str:
    from ingest.reader import looks_like_dicom

    if any(p.name == "zarr.json" and p.parent != root and (p.parent / "mrf_t1").exists()
           for p in root.rglob("zarr.json")):
        return "zarr"
    files = [p for p in root.rglob("*") if p.is_file()]
    if any(p.name.endswith((".nii", ".nii.gz")) for p in files):
        # a stray NIfTI (a mask, a dcm2niix output) beside DICOM maps would otherwise send the
        # whole upload down the NIfTI path, and the DICOM would be ignored without a word
        if any(looks_like_dicom(p) for p in files if not p.name.endswith((".nii", ".nii.gz"))):
            raise RequestError(422, "mixed_upload", "the zip holds both NIfTI and DICOM files: send the MRF "
                               "maps in one form")
        return "nifti"
    return "dicom"


def read_exam(root: Path, sites: dict[str, dict], site: str | None = None, work: Path | None = None,
              limits: Limits = Limits()) -> Exam:
    """The MRF maps of the one exam under ``root`` (an unpacked upload)."""
    if site is not None and site not in sites:
        raise RequestError(422, "unknown_site", f"site {site!r} is not configured; known: {', '.join(sorted(sites))}")
    kind = _kind(root)
    try:
        if kind == "zarr":
            exam = _read_store(root, site, limits)
        elif kind == "nifti":
            exam = _read_nifti(root, site, limits)
        else:
            exam = _read_dicom(root, sites, site, work or root.parent / "store")
    except RequestError as exc:
        # readers name files by their path on this server: the client knows them by the upload's
        exc.message = exc.message.replace(str(root) + os.sep, "").replace(str(root), ".")
        raise
    for role, a in (("mrf_t1", exam.affine), ("mrf_t2", exam.t2_affine)):
        _check_affine(role, a)
    return exam


def _check_affine(what: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all() or abs(float(np.linalg.det(a[:3, :3]))) < 1e-9:
        raise RequestError(422, "bad_maps", f"{what}: its voxel-to-patient affine is singular (a zero-length "
                           "or collapsed axis): no geometry to write the results back on")


def _check_units(role: str, units: str | None) -> None:
    from ingest.service import MS_UNITS

    if units and str(units).lower() not in MS_UNITS:
        raise RequestError(422, "wrong_units", f"{role}: the map is in {units!r}; the models take T1/T2 maps in ms")


def _check_voxels(what: str, shape, limit: int) -> None:
    n = int(np.prod([int(v) for v in shape], dtype=np.float64))
    if n > limit:
        raise RequestError(413, "map_too_large", f"{what}: {' x '.join(str(int(v)) for v in shape)} voxels "
                           f"declared, over the limit of {limit}; an MRF map is far smaller")


def _read_store(root: Path, site: str | None, limits: Limits = Limits()) -> Exam:
    from ingest.store import open_store

    folders = sorted({p.parent for p in root.rglob("zarr.json") if (p.parent / "mrf_t1").exists()})
    if len(folders) != 1:
        raise RequestError(422, "several_exams", f"the zip holds {len(folders)} exam stores; send one exam")
    try:
        st = open_store(folders[0])
        for r in ("mrf_t1", "mrf_t2"):
            _check_voxels(r, st.array(r).shape, limits.max_map_voxels)
        arr = {r: st.read(r) for r in ("mrf_t1", "mrf_t2")}
        attrs = {r: st.attrs_of(r) for r in ("mrf_t1", "mrf_t2")}
        affines = {r: np.asarray(attrs[r]["affine_lps"], float) for r in arr}
        if any(a.shape != (4, 4) for a in affines.values()):
            raise ValueError("affine_lps is not a 4 x 4 matrix")
    except RequestError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
        # RuntimeError: numcodecs' zstd on a corrupt chunk
        raise RequestError(422, "bad_store", f"exam store: {first_line(exc)}") from None
    for r in arr:
        _check_units(r, attrs[r].get("units"))
    return Exam("zarr", arr["mrf_t1"], arr["mrf_t2"], affines["mrf_t1"], affines["mrf_t2"],
                site=site or st.attrs.get("site"))


def _read_nifti(root: Path, site: str | None, limits: Limits = Limits()) -> Exam:
    from ingest.nifti import load_nifti_zyx, nifti_forms
    from ingest.prepare.grid import GridError, canonical_grid

    files = sorted(p for p in root.rglob("*") if p.name.endswith((".nii", ".nii.gz")))
    pick = {}
    for role, tag in (("mrf_t1", "t1"), ("mrf_t2", "t2")):
        hits = [p for p in files if _names_map(p.name, tag)]
        if len(hits) != 1:
            raise RequestError(422, "not_mrf", f"NIfTI upload: need exactly one file with {tag} as a word of its "
                               f"name (e.g. mrf_{tag}.nii.gz, {tag.upper()}map.nii) (found {len(hits)} among "
                               f"{len(files)})")
        pick[role] = hits[0]
    out, forms = {}, {}
    for role, p in pick.items():
        try:
            import nibabel as nib

            header = nib.load(str(p)).header
            shape, dtype = header.get_data_shape(), np.dtype(header.get_data_dtype())
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a broken file
            raise RequestError(422, "bad_nifti", f"{p.name}: not a readable NIfTI image "
                               f"({str(exc) or type(exc).__name__})") from None
        if len(shape) != 3:
            raise RequestError(422, "wrong_shape", f"{p.name}: a {len(shape)}-D image {tuple(shape)}; an MRF map is "
                               "one 3-D volume")
        if dtype.names or dtype.kind not in "biuf":
            raise RequestError(422, "bad_nifti", f"{p.name}: voxels of type {dtype}; an MRF map is one real "
                               "number per voxel")
        try:
            _check_voxels(p.name, shape, limits.max_map_voxels)
            forms[role] = nifti_forms(p)
            data, aff = load_nifti_zyx(p)
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a broken file
            raise RequestError(422, "bad_nifti", f"{p.name}: not a readable NIfTI image "
                               f"({str(exc) or type(exc).__name__})") from None
        if forms[role]["sform_code"] == 0 and forms[role]["qform_code"] == 0:
            # nibabel would make an orientation up from the voxel sizes: anterior could be posterior
            raise RequestError(422, "no_geometry", f"{p.name}: the header gives no patient orientation (sform_code "
                               "and qform_code 0); export the map with its scanner geometry")
        _check_affine(p.name, aff)
        try:
            canonical_grid(data.shape, aff)
        except GridError as exc:
            # the slices are NIfTI's third axis, as dcm2niix writes them: taking another axis for
            # them would cut a sagittal or coronal stack into axial slices unasked
            raise RequestError(422, "bad_maps", f"{p.name}: {exc} (a NIfTI holds its slices along its third "
                               "axis)") from None
        out[role] = (np.asarray(data, np.float32), aff)
    return Exam("nifti", out["mrf_t1"][0], out["mrf_t2"][0], out["mrf_t1"][1], out["mrf_t2"][1], site=site,
                nifti_forms=forms["mrf_t1"])


def _names_map(name: str, tag: str) -> bool:
    """``tag`` (t1, t2) as a word of a file name: "mrf_t1", "T1map", "MRF-T1_maps", not the t1 of
    "pat12_t2" nor of "T2_fit1"."""
    stem = re.sub(r"\.nii(\.gz)?$", "", name.lower())
    return any(re.fullmatch(rf"(?:mrf)?{tag}(?:maps?)?", w) for w in re.split(r"[^a-z0-9]+", stem))


def _upload_path(path, root: Path) -> str:
    """A file of the upload as its sender named it (never the server's temporary folder)."""
    p = Path(path)
    return str(p.relative_to(root)) if p.is_relative_to(root) else p.name


def _read_dicom(root: Path, sites: dict[str, dict], site: str | None, work: Path) -> Exam:
    from ingest.deid import load_key
    from ingest.series import benign_problem, group_series, scan
    from ingest.service import ExamJob, _clean_reason, ingest_exam, recognise
    from ingest.store import open_store

    infos, problems = scan(root)
    # A damaged file may hold a slice of a map: synthesising without it would return series a
    # slice short, or a slice moved, with nothing to say so. The client resends the exam.
    damaged = [(p, why) for p, why in problems if not benign_problem(why)]
    if damaged:
        p, why = damaged[0]
        more = f" (and {len(damaged) - 1} more damaged file(s))" if len(damaged) > 1 else ""
        raise RequestError(422, "bad_dicom", f"{_upload_path(p, root)}: {_clean_reason(why, root)}{more}; "
                           "resend the exam with every file complete")
    if not infos:
        why = problems[0][1] if problems else "no file"
        raise RequestError(422, "no_dicom", f"no DICOM image in the upload ({why})")
    studies = {i.study_uid for i in infos}
    if len(studies) > 1:
        raise RequestError(422, "several_exams", f"the upload holds {len(studies)} studies; send one exam")
    groups, _ = group_series(infos)
    # the site whose rules find both maps; the scanner's manufacturer breaks a tie
    candidates = [site] if site else list(sites)
    role_of = {name: [recognise(sites[name], g)[0] for g in groups] for name in candidates}
    found = [name for name in candidates if {"mrf_t1", "mrf_t2"} <= set(role_of[name])]
    if not found:
        descr = sorted({g.description or "(no description)" for g in groups})[:6]
        raise RequestError(422, "not_mrf", "no MRF T1 map and T2 map series in the upload (series seen: "
                           f"{'; '.join(descr)}); send the MRF map series of one exam")
    # A site is a scanner, not a vendor: another hospital's GE scanner must not get site B's
    # finetuned models, so the model name must match too where the site's config gives one
    scanners = {(str(i.manufacturer or "").strip().upper(), str(i.model or "").strip().upper()) for i in infos}
    same = [n for n in found
            if any(m == str(sites[n].get("manufacturer", "")).strip().upper()
                   and (not sites[n].get("model") or mm == str(sites[n]["model"]).strip().upper())
                   for m, mm in scanners)]
    chosen = (same or found)[0]
    known = bool(site) or bool(same)
    # Two series for one map (a repeated MRF scan, or the maps of two acquisitions) must not be
    # paired by a rule: T1 of one and T2 of the other would be maps of a head that moved.
    per_role: dict[str, list] = {}
    for g, role in zip(groups, role_of[chosen]):
        if role in ("mrf_t1", "mrf_t2"):
            per_role.setdefault(role, []).append(g)
    for role, gs in sorted(per_role.items()):
        if len(gs) > 1:
            numbers = [str(g.series_number) if g.series_number is not None else "?" for g in gs]
            split = " (one series split: its files differ in geometry or size)" if len({g.series_uid for g in gs}) < len(gs) else ""
            raise RequestError(422, "several_mrf_series",
                               f"the upload holds {len(gs)} {role} series (series number {', '.join(numbers)}){split}: "
                               "send the T1 and T2 maps of one MRF acquisition")
    job = ExamJob(chosen, "upload", [str(Path(i.path).relative_to(root)) for i in infos], [], list(infos))
    key, _ = load_key()
    res = ingest_exam(str(root), str(work), job, sites[chosen], key, {})
    rows = res["rows"]
    bad = {r["role"]: r["reason"] for r in rows if r["status"] == "quarantined" and r["role"] in ("mrf_t1", "mrf_t2")}
    if bad:
        role, why = sorted(bad.items())[0]
        raise RequestError(422, "bad_mrf_series", f"{role}: {why}")
    if res["status"] == "no-store":
        raise RequestError(422, "not_mrf", "no series of the upload could be read as an MRF map")
    st = open_store(work / res["store"])
    missing = [r for r in ("mrf_t1", "mrf_t2") if r not in st]
    if missing:
        raise RequestError(422, "not_mrf", f"the upload lacks the MRF {' and '.join(missing)} series")
    attrs = {r: st.attrs_of(r) for r in ("mrf_t1", "mrf_t2")}
    for r in attrs:
        _check_units(r, attrs[r].get("units"))
    sources = {}
    for r in ("mrf_t1", "mrf_t2"):
        sources[r] = sorted(root / row["path"] for row in rows if row["role"] == r and row["status"] == "ingested")
    notes = [f"{_upload_path(p, root)}: {_clean_reason(why, root)}" for p, why in problems]
    notes += [f"{r['path']}: {r['reason']}" for r in rows if r["status"] != "ingested"]
    maps = {r: st.read(r) for r in ("mrf_t1", "mrf_t2")}
    for r, v in maps.items():
        if v.ndim != 3:
            # ingest keeps repeats at one slice position as a 4th axis: as slices they would be
            # volumes mistaken for slices, on the grid and in the write-back
            raise RequestError(422, "wrong_shape", f"{r}: a {v.ndim}-D series {tuple(v.shape)} (repeated images at "
                               "each slice position?); an MRF map is one 3-D volume, one image per slice")
    return Exam("dicom", maps["mrf_t1"], maps["mrf_t2"], np.asarray(attrs["mrf_t1"]["affine_lps"], float),
                np.asarray(attrs["mrf_t2"]["affine_lps"], float), site=chosen if known else None,
                sources=sources, notes=notes)


def model_input(exam: Exam, contract: dict) -> dict:
    """Prepare's registration-free path on the exam's maps, under a model card's input contract."""
    from ingest.prepare.service import PrepareError, prepare_inputs

    try:
        return prepare_inputs(exam.t1, exam.t2, exam.affine, exam.t2_affine, contract)
    except PrepareError as exc:
        raise RequestError(422, "bad_maps", str(exc)) from None
