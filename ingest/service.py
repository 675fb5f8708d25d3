"""`qsnet ingest SRC DST`: a tree of multi-site DICOM -> one Zarr store per exam + a manifest.

Every input file ends as exactly one manifest row: `ingested`, `quarantined` (something is
wrong with it; the reason says what) or `ignored` (not ours to ingest; the reason says why).
A bad file never stops the other exams. Exams run in parallel processes; an exam whose inputs
and configuration have not changed since its store was written is not rewritten.

Layout expected under SRC: `<site>/<exam folder>/...` where `<site>` names a site file
(`ingest/sites/<site>.yaml`, or one in `--sites DIR`). Files are grouped into exams by
StudyInstanceUID and PatientID within a site (by folder where a file has no StudyInstanceUID),
into series as dcm2niix does, and given roles by the site's `match` rules. Phantom exams carry
`truth/` (labels, brain mask, poses) beside the DICOM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ingest import __version__
from ingest.reader import quiet_process, quiet_reads
from ingest.siteconfig import ROLES, SiteConfigError, builtin_sites, load_site

# A store made by another version is written again, not kept as "unchanged": 2 writes its
# shards at <role>/c.0.0.0 with zstd level 1 (1 wrote c/0/0/0, level 3).
INGEST_VERSION = "2"


class IngestError(ValueError):
    pass


@dataclass
class ExamJob:
    site: str
    exam_dir: str                      # relative to SRC, e.g. "site-A/sub-A01"
    files: list[str] = field(default_factory=list)   # relative DICOM paths
    truth: list[str] = field(default_factory=list)   # relative truth/ paths (phantom only)
    infos: list = field(default_factory=list)        # header summaries from the scan, one per file
    # Who the exam belongs to, from the scan (None: read from the first file). Kept out of
    # repr so that no traceback or log line can print them.
    patient_id: str | None = field(default=None, repr=False)
    identities: list[str] | None = field(default=None, repr=False)  # values to scrub from free text


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, initializer=quiet_process)


# ---------------------------------------------------------------- who an exam belongs to

# what an operator may type into free text (a series description) about this exam's patient;
# the people and the place of the exam go in as readily as the patient's name (all in group 0008)
_PERSON_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                    "ReferringPhysicianName", "PhysiciansOfRecord", "PerformingPhysicianName",
                    "NameOfPhysiciansReadingStudy", "OperatorsName")
_PLACE_KEYWORDS = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName")
IDENTITY_KEYWORDS = ("PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs") + _PERSON_KEYWORDS \
    + _PLACE_KEYWORDS


def _past_patient_group(tag, vr, length) -> bool:
    return tag.group > 0x0010  # the patient module and accession number come before it


_LITE_IDENTITY_MAX = 1 << 20  # a classic slice: the fast parser reads it whole, quicker than pydicom's head


def _identity_of(path) -> dict[str, str]:
    """Patient identity of one file ({} if it cannot be read). A small classic file goes through
    the fast parser (still in the page cache from the scan); anything else through pydicom, which
    parses only the head of the file, up to group 0010."""
    from ingest.dicomlite import read_lite

    try:
        ds = read_lite(path) if os.path.getsize(path) <= _LITE_IDENTITY_MAX else None
        if ds is None:
            from pydicom.filereader import read_partial

            with open(path, "rb") as fh:
                ds = read_partial(fh, stop_when=_past_patient_group, force=True)
        out = {}
        for kw in IDENTITY_KEYWORDS:
            v = ds.get(kw)
            if v is None:
                continue
            vals = [v] if isinstance(v, str) or not isinstance(v, Sequence) else list(v)
            text = "\\".join(str(x).strip() for x in vals if str(x).strip())
            if text:
                out[kw] = text
        return out
    except Exception:  # noqa: BLE001 - the scan parsed this file; an identity it cannot give is ""
        return {}


def _identity_values(idents) -> list[str]:
    """The identity strings to scrub, names and places marked as such (their single words go
    too, each kind with its own list of words that stay: ingest.deid)."""
    from ingest.deid import PersonName, PlaceName

    vals = set()
    for d in idents:
        for kw, v in d.items():
            kind = PersonName if kw in _PERSON_KEYWORDS else PlaceName if kw in _PLACE_KEYWORDS else str
            vals.add(kind(v))
            vals.update(kind(x) for x in v.split("\\") if x)  # each value of a multi-valued element too
    return sorted(vals)


def _names(key: bytes, job: ExamJob, patient_id: str, study_uid: str) -> tuple[str, str]:
    """(subject, patient) pseudonyms of an exam. One store per exam (a subject's visit): named by
    a keyed hash of patient and study, so a second visit of the same patient gets its own store;
    `patient` links the visits. Without a StudyInstanceUID the exam is its folder, so the folder
    stands for the study: two such visits of one patient must not share a store."""
    from ingest.deid import pseudonym

    who = patient_id or job.exam_dir
    subject = pseudonym(key, job.site, who, study_uid or f"folder:{job.exam_dir}")
    return subject, pseudonym(key, job.site, who, prefix="pat-")


def _exam_identity(src: Path, job: ExamJob) -> tuple[str, str, list[str]]:
    """(PatientID, StudyInstanceUID, identity strings to scrub) of an exam. What is read from
    its first file is kept on the job: the store path is worked out in the main process, the
    exam in a worker, and the job travels to the worker with it."""
    if job.patient_id is None or job.identities is None:
        ident = _identity_of(src / job.files[0]) if job.files else {}
        if job.patient_id is None:
            job.patient_id = ident.get("PatientID", "")
        if job.identities is None:
            job.identities = _identity_values([ident])
    study_uid = job.infos[0].study_uid if job.infos else ""
    return job.patient_id, study_uid, job.identities


def _all_identities(src: Path, job: ExamJob) -> list[str]:
    """The scrub's names from every series of the exam, not only its first file (a series sent
    again under a corrected PatientName): one file per series is read."""
    first_of: dict[tuple[str, object], str] = {}
    for info in job.infos:
        first_of.setdefault((info.series_uid, info.series_number), info.path)
    others = [p for p in first_of.values() if p != job.infos[0].path]   # none when no infos
    return sorted(set(_exam_identity(src, job)[2]) | set(_identity_values([_identity_of(p) for p in others])))


def _store_rel(key: bytes, job: ExamJob, src: Path) -> str:
    patient_id, study_uid, _ = _exam_identity(src, job)
    return f"{job.site}/{_names(key, job, patient_id, study_uid)[0]}.zarr"


# ---------------------------------------------------------------- reasons

# A dotted numeric OID (a DICOM UID, also a malformed one with letters in a component). UIDs of
# the DICOM standard itself (1.2.840.10008...: transfer syntaxes, SOP classes) name no one and
# tell a person what to install, so they stay.
# a relative path as reasons quote it: at least one folder, up to a space, quote or separator
_PATH_RE = re.compile(r"[^\s'\"`,;:()\[\]<>]+/[^\s'\"`,;:()\[\]<>]+")
_ASIDE = 0xF0000  # Supplementary Private Use Area-A
_UID_RE = re.compile(r"(?<![\w.])(?!1\.2\.840\.10008\.)[012]\.\d+(?:\.[0-9A-Za-z]+)+(?![\w.])")


def _clean_reason(reason: str, src, identities=()) -> str:
    """A manifest reason fit to share: paths relative to SRC (a reason quotes the reader's
    absolute paths), no instance UIDs, and free text (a series description) scrubbed of dates,
    names and this exam's own identifiers."""
    from ingest.deid import scrub_text

    text = str(reason)
    root = str(src).rstrip(os.sep)
    if root:
        text = text.replace(root + os.sep, "")
        text = re.sub(re.escape(root) + r"(?![^\s:;,)'\"])", ".", text)
    # The paths a reason quotes are the paths of the manifest's own rows: scrubbed, an exam
    # folder named by the PatientID or a StudyInstanceUID, or "IM0011.dcm" with ID "001" in it,
    # would point a person at a file that does not exist. They are set aside while the rest is
    # scrubbed of UIDs and identities.
    kept: list[str] = []

    def aside(m):
        if not root or not os.path.lexists(os.path.join(root, m.group(0))):
            return m.group(0)
        kept.append(m.group(0))
        return chr(_ASIDE + len(kept) - 1)  # one private-use character: no identity can match it

    text = scrub_text(_UID_RE.sub("<UID>", _PATH_RE.sub(aside, text)), identities)
    return "".join(kept[ord(c) - _ASIDE] if _ASIDE <= ord(c) < _ASIDE + len(kept) else c for c in text) if kept else text


# ---------------------------------------------------------------- roles

def recognise(site_cfg: dict, group) -> tuple[str | None, str, bool]:
    """(role, "", False) of a series by the site's `match` rules, or (None, the reason, whether
    that is a fault): a series that matches no role is not ours to take; one that matches
    several would cost a role, unseen, were it ignored."""
    desc = group.description or ""
    component = group.complex_component
    if component in ("PHASE", "IMAGINARY", "FIELD_MAP"):
        # every role is a magnitude image or a real-valued map: the phase of a series whose
        # rule matches (GE keeps it under the magnitude's description) would compete for its role
        return None, f"series '{desc}' holds {component} images: roles take magnitude images or real-valued maps", False
    itype = [str(t).upper() for t in (group.image_type or [])]
    hits = []
    for role in ROLES:
        rule = site_cfg["series"].get(role, {}).get("match")
        if not rule:
            continue
        if "description" in rule and not re.search(rule["description"], desc):
            continue
        if any(str(t).upper() not in itype for t in rule.get("image_type_all", [])):
            continue
        if "echo" in rule and group.echo_number != rule["echo"]:
            continue
        hits.append(role)
    if not hits:
        return None, f"series '{desc}' matches no role of {site_cfg['site']} (see {site_cfg['_source']})", False
    if len(hits) > 1:
        return None, (f"series '{desc}' matches several roles ({', '.join(hits)}) of {site_cfg['site']}: ambiguous; "
                      f"make the rules in {site_cfg['_source']} tell them apart"), True
    return hits[0], "", False


def load_sites(sites_dir: Path | None) -> dict[str, dict]:
    """The built-in sites, then those of ``sites_dir`` (one of which may replace a built-in one
    of its name). A file is named after its site, as the site's folder in SRC is: a copy of
    site-A.yaml saved as site-C.yaml that still says ``site: site-A`` would replace site A's
    rules, unseen, and leave site C without any."""
    sites = {name: load_site(name) for name in builtin_sites()}
    if sites_dir is not None:
        for p in sorted(Path(sites_dir).glob("*.y*ml")):
            cfg = load_site(p)
            if cfg["site"] != p.stem:
                raise SiteConfigError(f"{p}: says site {cfg['site']!r}; a site file is named after its site "
                                      f"(its folder in the input tree): {cfg['site']}.yaml, or site: {p.stem}")
            sites[cfg["site"]] = cfg
    return sites


# ---------------------------------------------------------------- planning

def plan_exams(src: Path, sites: dict[str, dict], jobs: int = 1, pool=None):
    """Scan SRC once: DICOM files grouped into exams (site, study), plus rows for the rest."""
    from ingest.series import benign_problem, scan

    infos, problems = scan(src, jobs=jobs, pool=pool)
    rows = []
    exams: dict[tuple[str, str, str], ExamJob] = {}

    def where(path: Path) -> tuple[str | None, str | None, str]:
        rel = path.relative_to(src)
        if len(rel.parts) < 3:
            return None, None, str(rel)
        return rel.parts[0], rel.parts[1], str(rel)

    truth_files: dict[tuple[str, str], list[str]] = {}
    for path, reason in problems:
        path = Path(path)
        site, folder, rel = where(path) if path.is_relative_to(src) else (None, None, str(path))
        if site in sites and Path(rel).parts[2:3] == ("truth",):
            truth_files.setdefault((site, folder), []).append(rel)
            continue
        # Valid DICOM that is not an image (DICOMDIR, reports, presentation states) and
        # non-DICOM files are not ours to ingest; anything else wrong is quarantined.
        status = "ignored" if benign_problem(reason) else "quarantined"
        rows.append(_row(src, rel, status, _clean_reason(reason, src), site=site or ""))
    # Exams are studies (StudyInstanceUID within a site), as a PACS sees them: copies of one
    # study in two folders are one exam, one folder holding two studies is two exams. The
    # patient is part of the key: a site whose anonymiser or PACS reuses study UIDs must not
    # file one patient's images under another's pseudonym.
    # A file whose StudyInstanceUID or PatientID is missing (one damaged slice) belongs with its
    # series: keyed on its own it made a one-slice exam, and the real one lost that slice (and
    # with it the role) as "missing".
    placed = [(info, *where(Path(info.path))) for info in infos]
    whole: dict[tuple[str, str], set] = {}
    for info, site, _, _ in placed:
        if info.study_uid and info.patient_id and info.series_uid:
            whole.setdefault((site, info.series_uid), set()).add((info.study_uid, info.patient_id))
    folders_of: dict[tuple[str, str, str], dict[str, int]] = {}
    for info, site, folder, rel in placed:
        if site is None:
            rows.append(_row(src, rel, "quarantined", "not inside a <site>/<exam>/ folder: cannot tell its site"))
            continue
        if site not in sites:
            rows.append(_row(src, rel, "quarantined",
                             f"unknown site folder '{site}': add a site file ingest/sites/{site}.yaml or --sites DIR",
                             site=site))
            continue
        patient_id, study = info.patient_id, info.study_uid
        owners = [] if study and patient_id else [  # the complete ones it does not contradict
            (s, p) for s, p in whole.get((site, info.series_uid), ()) if s == (study or s) and p == (patient_id or p)]
        if len(owners) == 1:
            study, patient_id = next(iter(owners))
        key = (site, study or f"folder:{folder}", patient_id)
        job = exams.setdefault(key, ExamJob(site, f"{site}/{folder}", patient_id=patient_id))
        job.files.append(rel)
        job.infos.append(info)
        counts = folders_of.setdefault(key, {})
        counts[folder] = counts.get(folder, 0) + 1
    # Phantom ground truth belongs to the study that owns most files of its folder.
    owner = {}
    for key, counts in folders_of.items():
        for folder, n in counts.items():
            best = owner.get((key[0], folder))
            if best is None or n > best[1]:
                owner[(key[0], folder)] = (key, n)
    for (site, folder), rels in truth_files.items():
        if (site, folder) in owner:
            exams[owner[(site, folder)][0]].truth.extend(rels)
        else:
            rows.extend(_row(src, r, "ignored", "ground truth without DICOM of its exam", site=site) for r in rels)
    return sorted(exams.values(), key=lambda j: j.exam_dir), rows


def _row(src: Path, rel: str, status: str, reason: str, **kw):
    from ingest.manifest import Row

    return Row.for_file(src, rel, status, reason, **kw)


# ---------------------------------------------------------------- one exam (runs in a worker process)

MS_UNITS = ("ms", "msec", "millisecond", "milliseconds")  # spellings of ms in map headers and stores
S_UNITS = ("s", "sec", "second", "seconds")
UNSPECIFIED_UNITS = ("US", "UNSPECIFIED", "NONE")   # RescaleType US: the units are not said


def _maps_in_ms(vol: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
    """An MRF map in ms: a map in seconds is converted, one in other units is a SeriesError, one
    whose units are not said is taken as ms. When the header's Real World Value Mapping gives the map in ms and the
    Rescale Slope/Intercept (type US: units unspecified) say otherwise, the mapping is the
    quantity: the stored values are mapped with it, not with the display rescale (which would
    silently scale every T1 by the ratio of the two)."""
    rwv = meta.get("real_world_value_mapping") or {}
    slope, icpt = meta.get("rescale_slope"), meta.get("rescale_intercept")
    units = str(meta.get("units") or "").strip()
    if units.lower() in MS_UNITS or str(rwv.get("units") or "").lower() not in MS_UNITS:
        if units.lower() in S_UNITS:
            return (np.asarray(vol, np.float64) * 1000.0).astype(np.float32), {**meta, "units": "ms",
                                                                                "converted_from": units}
        if units and units.lower() not in MS_UNITS and units.upper() not in UNSPECIFIED_UNITS:
            from ingest.reader import SeriesError

            raise SeriesError(f"the map's values are in {units!r} (RescaleType or its Real World Value "
                              "Mapping): MRF maps are taken in ms or s")
        return vol, meta
    rs, ri = rwv.get("slope"), rwv.get("intercept")
    if rs is None or slope is None or icpt is None or slope == 0:
        return vol, meta  # per-frame rescale: no single inversion to the stored values
    stored = (np.asarray(vol, np.float64) - icpt) / slope
    out = (stored * rs + (ri or 0.0)).astype(np.float32)
    return out, {**meta, "units": "ms", "rescale_slope": rs, "rescale_intercept": ri or 0.0,
                 "mapped_by": "real_world_value_mapping"}


# What made the stores and the manifest's rows: a store is reused as unchanged only if this code
# made it. Kept beside the manifest (``<manifest>.code``), not under DST: a code change that writes
# the same stores must leave DST's bytes, and so `dvc repro`'s downstream stages, as they were;
# and DVC checks it out with the manifest whose rows it vouches for.
CODE_SUFFIX = ".code"


def code_marker(manifest: Path) -> Path:
    return Path(manifest).with_name(Path(manifest).name + CODE_SUFFIX)
_CODE_FILES = ("__init__.py", "reader.py", "dicomlite.py", "series.py", "service.py", "store.py", "deid.py",
               "manifest.py", "nifti.py", "siteconfig.py")


def _code_hash() -> str:
    from ingest.manifest import code_hash

    here = Path(__file__).resolve().parent
    return code_hash(here / name for name in _CODE_FILES)


def _exam_digest(job: ExamJob, shas: dict[str, str], site_cfg: dict) -> str:
    h = hashlib.sha256()
    h.update(f"ingest {INGEST_VERSION}\n".encode())
    h.update(json.dumps({k: v for k, v in site_cfg.items() if not k.startswith("_")}, sort_keys=True).encode())
    for rel in sorted(job.files + job.truth):
        h.update(f"{rel}\0{shas[rel]}\n".encode("utf-8", "surrogateescape"))  # non-UTF-8 names too
    return h.hexdigest()


def _split(subject: str, site_cfg: dict, fractions: dict) -> str:
    """Deterministic from the pseudonym: the same subject lands in the same split everywhere.
    Called with the patient pseudonym, so every visit of one patient lands in one split."""
    u = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) / 2 ** 32
    first, second = ("finetune", "test") if site_cfg.get("cohort") == "gbm" else ("train", "test")
    return first if u < fractions.get(site_cfg["site"], 0.5) else second


def ingest_exam(src: str, dst: str, job: ExamJob, site_cfg: dict, key: bytes, split_fractions: dict,
                prev_rows: list[dict] | None = None) -> dict:
    """Read, recognise and store one exam; return its manifest rows (as dicts) and a status.

    `prev_rows` are this exam's rows of the previous manifest: when the store on disk was
    written from exactly these inputs (same file hashes, same site file, same ingest version),
    the old rows cover every file and the store holds every array they say was ingested,
    nothing is read again and those rows stand.
    """
    with quiet_reads():  # ingest's reads only, never the importing process
        return _ingest_exam(src, dst, job, site_cfg, key, split_fractions, prev_rows)


def _ambiguous(cands: list[tuple], role: str) -> tuple[list[tuple], list[tuple[list[tuple], str]]]:
    """(candidates, ambiguous) for one role. Taken out, with why, when the role's rule accepts
    more than one of: the kinds of one enhanced object (group_series splits a B0 map into its
    magnitude and field-map frames), or the echoes of one series (a dual-echo TSE is a PD and a
    T2-weighted image). Keeping the first would hand the role whichever sorts first: a
    PD-weighted image stored as T2w, a field map as SWI."""
    out: list[tuple[list[tuple], str]] = []
    by_files: dict[frozenset, list[tuple]] = {}
    for c in cands:
        if c[0].frame_type:
            by_files.setdefault(frozenset(c[0].files), []).append(c)
    for same in by_files.values():
        if len(same) > 1:
            names = ", ".join(g.frame_type for g, _ in same)
            out.append((same, f"series {same[0][1]} holds frames of {len(same)} kinds (FrameType {names}) and "
                              f"the site's match rule for role {role} accepts more than one: name the kind in "
                              "its image_type_all"))
    by_series: dict[str, list[tuple]] = {}
    for c in cands:
        if c[0].echo_number is not None and not c[0].frame_type:
            by_series.setdefault(c[0].series_uid, []).append(c)
    for same in by_series.values():
        echoes = sorted({g.echo_number for g, _ in same})
        if len(echoes) > 1:
            out.append((same, f"series {same[0][1]} has echoes {', '.join(map(str, echoes))} and the site's "
                              f"match rule for role {role} accepts more than one: name the echo in its rule "
                              "(match: {echo: N})"))
    dropped = {id(c) for same, _ in out for c in same}
    return [c for c in cands if id(c) not in dropped], out


def _magnitude_parts(cands: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """(candidates, passed over) for one role: where one series and echo offers the role its
    magnitude part and a real part (a GE complex series), the role takes the magnitude. The real
    part is an image of its own, not a fragment to quarantine beside the magnitude."""
    mags = {(c[0].series_uid, c[0].echo_number) for c in cands if c[0].complex_component == "MAGNITUDE"}
    over = [c for c in cands if (c[0].series_uid, c[0].echo_number) in mags
            and c[0].complex_component not in ("", "MAGNITUDE")]
    dropped = {id(c) for c in over}
    return [c for c in cands if id(c) not in dropped], over


def _largest_parts(cands: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """(candidates, fragments) for one role: of the parts of one series and echo (same
    SeriesInstanceUID and EchoNumbers, split by group_series) only the one with the most files
    stays a candidate, in the place of the series' first part; the others are returned as
    (group, series id, the part kept)."""
    by_series: dict[tuple, list[tuple]] = {}
    for c in cands:
        by_series.setdefault((c[0].series_uid, c[0].echo_number), []).append(c)
    kept, fragments, seen = [], [], set()
    for c in cands:
        k = (c[0].series_uid, c[0].echo_number)
        if k in seen:
            continue
        seen.add(k)
        parts = by_series[k]
        best = max(parts, key=lambda p: len(p[0].files))  # the first of equals
        kept.append(best)
        fragments.extend((g, sid, best[0]) for g, sid in parts if g is not best[0])
    return kept, fragments


def _ingest_exam(src, dst, job, site_cfg, key, split_fractions, prev_rows):
    from ingest.deid import pseudonym, scrub_text
    from ingest.manifest import file_sha256
    from ingest.nifti import load_nifti_zyx
    from ingest.reader import SeriesError, plan_is_current, read_series
    from ingest.series import group_series, part_difference
    from ingest.store import open_store, write_exam_store

    src_p, dst_p = Path(src), Path(dst)
    rows: dict[str, dict] = {}
    # the scan hashed the files it parsed in full; the rest, and any file changed since, here
    scanned = {rel: info.sha256 for info, rel in zip(job.infos, job.files)
               if info.sha256 and plan_is_current(info.path, info.plan)}
    shas = {rel: scanned.get(rel) or file_sha256(src_p / rel) for rel in job.files + job.truth}

    # relative paths from the scan (pathlib calls per file and row add up on big trees)
    rel_of = {info.path: rel for info, rel in zip(job.infos, job.files)}

    patient_id, study_uid, identities = _exam_identity(src_p, job)

    def row(rel, status, reason="", **kw):
        rows[rel] = dict(path=rel, size=os.stat(os.path.join(src, rel)).st_size, sha256=shas[rel], status=status,
                         reason=_clean_reason(reason, src_p, identities) if reason else "", site=job.site,
                         subject=kw.get("subject", ""), series=kw.get("series", ""), role=kw.get("role", ""))

    subject, patient = _names(key, job, patient_id, study_uid)
    digest = _exam_digest(job, shas, site_cfg)
    store_path = dst_p / job.site / f"{subject}.zarr"
    if store_path.exists() and prev_rows is not None:
        old = {r["path"]: r for r in prev_rows}
        covered = all(rel in old and old[rel]["sha256"] == shas[rel] for rel in job.files + job.truth)
        stored = {r["role"] for r in prev_rows if r["status"] == "ingested" and r["role"] and r["role"] != "truth"}
        # rows of a run that wrote no store (a worker that died, a site file that matched
        # nothing) stand beside the store of an earlier run: they must not stand for it
        ours = bool(stored) and all(r.get("subject") == subject for r in prev_rows)
        try:
            st = open_store(store_path) if covered and ours else None
            # every array with its metadata and its shard: a store damaged after it was written
            # (a delete killed midway) must not pass as unchanged
            same = (st is not None and set(st.roles) == stored and all(st.has_data(r) for r in stored)
                    and st.attrs.get("input_digest") == digest)
        except ValueError:
            same = False
        if same:
            return {"exam": job.exam_dir, "status": "unchanged", "rows": [old[k] for k in sorted(old)],
                    "store": str(store_path.relative_to(dst_p))}

    groups, dup_problems = group_series(job.infos)
    info_of = {info.path: info for info in job.infos}
    # the store path needs the first file's identity only; the scrub, every series' names
    identities = _all_identities(src_p, job)
    for path, reason in dup_problems:
        row(rel_of[path], "quarantined", reason, subject=subject)
    arrays: dict[str, tuple[np.ndarray, dict]] = {}
    candidates: dict[str, list[tuple[object, str]]] = {}
    for g in groups:
        series_id = pseudonym(key, job.site, g.key, prefix="ser-")
        role, why, fault = recognise(site_cfg, g)
        if role is None:
            for f in g.files:
                row(rel_of[f], "quarantined" if fault else "ignored", why, subject=subject, series=series_id)
            continue
        candidates.setdefault(role, []).append((g, series_id))
    for role, cands in candidates.items():
        # The first series of a role that reads is kept; a broken one (a repeat is often the
        # scan that replaced it) must not cost the role its good repeat. A series split into
        # parts by disagreeing headers (one slice without SeriesNumber, another PixelSpacing)
        # offers only its largest part: a one-slice fragment must never stand in for the
        # volume, nor the volume be dropped as "a second series" beside it.
        # a colour rendering (a fused or annotated copy) that the role's rules match is never
        # a candidate: it must not stand in for the volume, nor a part of it oust the greyscale one
        colour = [(g, sid) for g, sid in cands if g.colour]
        cands = [(g, sid) for g, sid in cands if not g.colour]
        cands, ambiguous = _ambiguous(cands, role)
        for same, why in ambiguous:
            for g, series_id in same:
                for f in g.files:
                    row(rel_of[f], "quarantined", why, subject=subject, series=series_id, role=role)
        cands, passed = _magnitude_parts(cands)
        for g, series_id in passed:
            for f in g.files:
                row(rel_of[f], "ignored", f"{g.complex_component} images of series {series_id}: role {role} takes "
                    "its MAGNITUDE part", subject=subject, series=series_id, role=role)
        cands, fragments = _largest_parts(cands)
        for g, series_id, whole in fragments:
            why = part_difference(info_of[g.files[0]], info_of[whole.files[0]])
            for f in g.files:
                row(rel_of[f], "quarantined",
                    f"{len(g.files)} file(s) of series {series_id} for role {role} differ from its other "
                    f"{len(whole.files)} ({why}): left out of the volume; check these files",
                    subject=subject, series=series_id, role=role)
        kept = None
        for g, series_id in cands:
            rels = [rel_of[f] for f in g.files]
            if kept is not None:
                for r in rels:
                    row(r, "ignored", f"a second series for role {role} (kept {kept})",
                        subject=subject, series=series_id, role=role)
                continue
            try:
                vol, affine, meta = read_series(g.files, infos=[info_of[f] for f in g.files],
                                                frame_type=g.frame_type or None)
            except SeriesError as exc:
                for r in rels:
                    row(r, "quarantined", str(exc), subject=subject, series=series_id, role=role)
                continue
            except Exception as exc:  # noqa: BLE001 - a reader bug on one series must not lose the exam
                for r in rels:
                    row(r, "quarantined", f"{rels[0]}: unreadable series ({exc.__class__.__name__}: {exc})",
                        subject=subject, series=series_id, role=role)
                continue
            if role.startswith("mrf"):
                try:
                    vol, meta = _maps_in_ms(vol, meta)
                except SeriesError as exc:
                    for r in rels:
                        row(r, "quarantined", f"{rels[0]}: {exc}", subject=subject, series=series_id, role=role)
                    continue
            kept = series_id
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            attrs = {
                "role": role, "affine_lps": np.round(affine, 6).tolist(),
                "spacing": [round(float(s), 6) for s in spacing],
                "units": meta.get("units") or ("ms" if role.startswith("mrf") else "scanner"),
                "series": series_id, "vendor": meta.get("manufacturer", ""), "model": meta.get("model", ""),
                "tr": meta.get("tr"), "te": meta.get("te"), "ti": meta.get("ti"),
                "flip_angle": meta.get("flip_angle"),
                # free text from the scanner: scrubbed of names, dates and this patient's own
                # identifiers (PS3.15 clean descriptors)
                "sequence_name": scrub_text(meta.get("sequence_name", "") or "", identities),
                "series_description": scrub_text(meta.get("series_description", "") or "", identities),
            }
            arrays[role] = (vol.astype(np.float32), attrs)
            for r in rels:
                row(r, "ingested", "", subject=subject, series=series_id, role=role)
        for g, series_id in colour:
            # beside the role's greyscale series it is a copy to pass over; alone, the role is lost
            # and the site must send the greyscale series (or its rules must not match this one)
            why = (f"colour ({g.colour}) images of series {series_id}: role {role} takes greyscale images"
                   + (f" (kept {kept})" if kept else "; no greyscale series of this role was read"))
            for f in g.files:
                row(rel_of[f], "ignored" if kept else "quarantined", why, subject=subject, series=series_id,
                    role=role)
    # phantom ground truth: labels and brain on the MRF grid, poses for registration checks
    truth_attrs = {}
    for rel in job.truth:
        name = Path(rel).name
        try:
            if name == "truth.json":
                t = json.loads((src_p / rel).read_text())
                truth_attrs = {"phantom_truth": {"series": {r: {"pose_head_to_lps": s["pose_head_to_lps"],
                                                               "affine_lps": s["affine_lps"]}
                                                           for r, s in t.get("series", {}).items()},
                                                "lesions": t.get("lesions", [])}}
                row(rel, "ingested", "", subject=subject, role="truth")
            elif name in ("labels.nii.gz", "brain.nii.gz"):
                arr, aff = load_nifti_zyx(src_p / rel)
                arr = arr.astype(np.uint8)
                ref = arrays.get("mrf_t1")
                if ref is None:
                    row(rel, "quarantined", f"{rel}: ground truth on the MRF grid, and this exam has no MRF T1 map "
                                            "(see its MRF series' rows)", subject=subject)
                    continue
                if ref[0].shape != arr.shape or not np.allclose(aff, ref[1]["affine_lps"], atol=0.01):
                    row(rel, "quarantined", f"{rel}: not on the grid of the exam's MRF T1 map", subject=subject)
                    continue
                role = name.split(".")[0]
                arrays[role] = (arr, {"role": role, "affine_lps": np.round(aff, 6).tolist(), "units": "label"})
                row(rel, "ingested", "", subject=subject, role=role)
            else:
                row(rel, "ignored", f"{rel}: not a ground-truth file this version reads", subject=subject)
        except Exception as exc:  # noqa: BLE001
            row(rel, "quarantined", f"{rel}: unreadable ground truth ({exc})", subject=subject)
    status = "written"
    if not any(r in arrays for r in ROLES):
        # An exam with images that gives no store is lost data, not "nothing to ingest": every
        # row says so, so that --strict fails and a person looks at the site file or the series.
        status = "no-store"
        if candidates:
            why = f"exam {job.exam_dir}: no series of this exam could be read: no store written"
        else:
            why = (f"exam {job.exam_dir}: no series matched a role of the site config ({site_cfg['_source']}): "
                   "no store written; fix the site's match rules or the series descriptions")
        for r in list(rows):
            if rows[r]["status"] != "quarantined":
                extra = f" (this file: {rows[r]['reason']})" if rows[r]["reason"] else ""
                rows[r].update(status="quarantined", reason=_clean_reason(why + extra, src_p, identities))
    else:
        # the split follows the patient, not the visit: two visits in train and test would leak
        group_attrs = {"site": job.site, "subject": subject, "patient": patient, "cohort": site_cfg.get("cohort", ""),
                       "split": _split(patient, site_cfg, split_fractions), "ingest_version": INGEST_VERSION,
                       "qsnet_version": __version__, "input_digest": digest,
                       "roles_missing": [r for r in ROLES if r not in arrays], **truth_attrs}
        try:
            before = os.stat(store_path / "zarr.json").st_mtime_ns
        except OSError:
            before = None
        write_exam_store(store_path, arrays, group_attrs)
        if before is not None and os.stat(store_path / "zarr.json").st_mtime_ns == before:
            status = "unchanged"  # made again by another ingest version, byte for byte the same: kept
    return {"exam": job.exam_dir, "status": status, "rows": [rows[k] for k in sorted(rows)],
            "store": str(store_path.relative_to(dst_p)) if status != "no-store" else ""}


# ---------------------------------------------------------------- the whole tree

def ingest(src: Path, dst: Path, manifest: Path | None = None, sites_dir: Path | None = None,
           jobs: int | None = None, strict: bool = False, split_fractions: dict | None = None,
           progress=None, prune: bool = False) -> dict:
    src, dst = Path(src).resolve(), Path(dst)
    if not src.is_dir():
        raise IngestError(f"{src}: input folder does not exist")
    manifest = Path(manifest) if manifest else dst.parent / "manifest.csv"
    for what, p in (("the store folder", dst), ("the manifest", manifest)):
        if p.resolve().is_relative_to(src):
            raise IngestError(f"{p}: {what} is inside the input folder {src}: the next run would read it as "
                              "input; put it outside")
    new_dirs = _missing_dirs(dst)
    new_dirs += [d for d in _check_writable(manifest) if d not in new_dirs]
    try:
        return _ingest_tree(src, dst, manifest, sites_dir, jobs, strict, split_fractions, progress, prune)
    except BaseException:
        _remove_empty(new_dirs)
        raise


def _ingest_tree(src: Path, dst: Path, manifest: Path, sites_dir, jobs, strict, split_fractions,
                 progress, prune) -> dict:
    from ingest.deid import load_key
    from ingest.manifest import Row, write_manifest
    from ingest.store import _fsync_path

    sites = load_sites(sites_dir)
    key, key_source = load_key()
    split_fractions = split_fractions or {"site-A": 20 / 32, "site-B": 9 / 18}
    workers = max(1, jobs or os.cpu_count() or 1)
    # one pool for the header scan and the exams: worker start-up is paid once, and the
    # modules the workers need are imported before the fork, not once per worker
    import ingest.reader  # noqa: F401
    import ingest.store  # noqa: F401

    with quiet_reads():  # ingest's reads only, never the importing process
        pool = _new_pool(workers) if workers > 1 else None
        try:
            exam_jobs, rows = plan_exams(src, sites, jobs=workers, pool=pool)
            if not exam_jobs:
                # Nothing to ingest is a wrong SRC (a site folder, an unmounted share, data not
                # pulled), never an empty dataset: a manifest and --prune would wipe DST.
                raise IngestError(_no_exams_message(src, sites, rows))
            # largest exams first, so no worker is left with a big one at the end (the manifest
            # is sorted by path, so the order changes nothing in the output)
            exam_jobs.sort(key=lambda j: -sum(i.size for i in j.infos))
            code = _code_hash()
            marker = code_marker(manifest)
            try:
                same_code = marker.read_text().strip() == code
            except OSError:
                same_code = False
            if not same_code and marker.exists():
                # gone before the first store is rewritten: a run cut short must leave no marker
                # vouching for stores it had half redone
                marker.unlink()
                _fsync_path(marker.parent, directory=True)
            # another version's stores are made again; a store that comes out the same is kept
            # byte for byte (write_exam_store), so only what the change changed is rewritten
            previous = _previous_rows(manifest) if same_code else {}
            dst.mkdir(parents=True, exist_ok=True)
            store_of = [_store_rel(key, j, src) for j in exam_jobs]
            results: list[dict | None] = [None] * len(exam_jobs)
            for i, res in _colliding(src, exam_jobs, store_of).items():
                results[i] = res
                if progress:
                    progress(res)
            todo = [i for i, r in enumerate(results) if r is None]
            args = [(str(src), str(dst), j, sites[j.site], key, split_fractions,
                     [previous[r] for r in j.files + j.truth if r in previous]) for j in exam_jobs]
            for i, res in _run_exams(pool, workers, todo, args, progress).items():
                results[i] = res
        finally:
            if pool is not None:
                pool.shutdown()
    # An exam still in SRC keeps its store even when this run wrote none for it (its rows say
    # why): --prune removes the stores of exams that left SRC, not of exams that went wrong.
    kept = sorted({rel for rel, res in zip(store_of, results)
                   if res["status"] not in ("written", "unchanged") and (dst / rel).is_dir()})
    # A file the scan could not place in an exam (unreadable header, a site folder without a site
    # file) may belong to an exam whose store is under DST: which one cannot be told, so nothing
    # is pruned until those files are read again or leave SRC.
    unplaced = sum(1 for r in rows if r.status == "quarantined")
    pruned = _prune(dst, set(store_of)) if prune and not unplaced else []
    # a store left by an exam that left SRC, or whose PatientID or StudyInstanceUID was corrected
    # (its images now write another store): said, so two stores of one exam are not a surprise
    orphans = [] if prune and not unplaced else _stores_not_in(dst, set(store_of))
    for res in results:
        rows.extend(Row(**r) for r in res["rows"])
    try:
        write_manifest(manifest, rows)
    except OSError as exc:
        raise IngestError(f"{manifest}: cannot write the manifest ({exc.strerror or exc}); the stores under {dst} "
                          "are written: run again once it can be written") from None
    if not same_code:
        # after the manifest: its rows are what a later run's unchanged check reads
        tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
        tmp.write_text(code + "\n")
        os.replace(tmp, marker)
        _fsync_path(marker.parent, directory=True)
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("ingested", "quarantined", "ignored")}
    summary = {"exams": len(exam_jobs), "written": sum(r["status"] == "written" for r in results),
               "unchanged": sum(r["status"] == "unchanged" for r in results),
               "no_store": sum(r["status"] == "no-store" for r in results),
               "files": len(rows), **counts, "manifest": str(manifest), "key_source": key_source,
               "pruned": len(pruned), "kept": len(kept), "orphans": len(orphans),
               "prune_held": unplaced if prune else 0}
    if strict and counts["quarantined"]:
        summary["strict_failed"] = True
    return summary


def _check_writable(manifest: Path) -> list[Path]:
    """Before any store is written: a manifest that cannot be written would fail the run at its end.
    Returns the folders it had to make."""
    import tempfile

    made = _missing_dirs(manifest.parent)
    try:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=manifest.parent, prefix=f".{manifest.name}.probe-"):
            pass
    except OSError as exc:
        _remove_empty(made)
        raise IngestError(f"{manifest}: cannot write the manifest there ({exc.strerror or exc}): "
                          "nothing ingested") from None
    return made


def _missing_dirs(folder: Path) -> list[Path]:
    return [d for d in (folder, *folder.parents) if not d.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """A run that fails leaves no folder it made for nothing; rmdir refuses one that holds stores."""
    for d in sorted(folders, key=lambda p: -len(p.absolute().parts)):
        try:
            d.rmdir()
        except OSError:
            pass


def _no_exams_message(src: Path, sites: dict, rows: list) -> str:
    msg = (f"{src}: no <site>/<exam>/ DICOM folders under SRC: point it at the tree root (the folder that "
           f"holds {', '.join(s + '/' for s in sorted(sites))})")
    elsewhere = sum(1 for r in rows if r.status == "quarantined")
    if elsewhere:
        msg += (f"; {elsewhere} file(s) lie outside a known site folder (a new site needs its site file: "
                "--sites DIR)")
    return msg


def _colliding(src: Path, exam_jobs: list[ExamJob], store_of: list[str]) -> dict[int, dict]:
    """Exams that would write one store path: none of them is run (one would overwrite the
    other's store); their rows are quarantined."""
    by_store: dict[str, list[int]] = {}
    for i, rel in enumerate(store_of):
        by_store.setdefault(rel, []).append(i)
    out = {}
    for rel, idx in by_store.items():
        if len(idx) < 2:
            continue
        names = ", ".join(sorted(exam_jobs[i].exam_dir for i in idx))
        for i in idx:
            job = exam_jobs[i]
            out[i] = _quarantined(src, job, f"exam {job.exam_dir}: exams {names} would write the same store {rel} "
                                            "(same patient and visit): none written; check their PatientID and "
                                            "StudyInstanceUID")
    return out


def _quarantined(src: Path, job: ExamJob, reason: str) -> dict:
    from dataclasses import asdict

    try:
        identities = _all_identities(Path(src), job)
    except Exception:  # noqa: BLE001 - an exam this broken still gets its rows; the first file's names
        identities = job.identities or []
    reason = _clean_reason(reason, src, identities)
    rows = [asdict(_row(Path(src), rel, "quarantined", reason, site=job.site)) for rel in job.files + job.truth]
    return {"exam": job.exam_dir, "status": "no-store", "rows": rows, "store": ""}


def _run_exams(pool, workers: int, todo: list[int], args: list[tuple], progress=None) -> dict[int, dict]:
    """Results of the exams `todo` (indices into `args`). A worker that dies (the OOM killer,
    a segfault in a decoder) breaks its whole pool: the exams that were in flight then are
    tried again one at a time, each alone in a fresh pool, and one that kills its worker
    even alone is quarantined; the exams not started yet go on in a fresh pool."""
    results: dict[int, dict] = {}

    def done(i, res):
        results[i] = res
        if progress:
            progress(res)

    if pool is None:
        for i in todo:
            done(i, _guarded(*args[i]))
        return results
    own = []  # pools made here: the caller shuts down the one it passed
    try:
        while todo:
            suspects, todo = _run_pool(pool, workers, todo, args, done)
            for i in suspects:
                alone = _new_pool(1)
                try:
                    died = any(_run_pool(alone, 1, [i], args, done))
                finally:
                    alone.shutdown(wait=True)
                if died:
                    src, _, job = args[i][:3]
                    done(i, _quarantined(Path(src), job, f"exam {job.exam_dir}: the worker ingesting this exam died "
                                                         "(out of memory or a crash in a decoder): no store written; "
                                                         "free memory or lower --jobs, then run again"))
            if todo:
                pool = _new_pool(workers)
                own.append(pool)
    finally:
        for p in own:
            p.shutdown(wait=True, cancel_futures=True)
    return results


def _run_pool(pool, width: int, todo: list[int], args: list[tuple], done) -> tuple[list[int], list[int]]:
    """Run `todo` on `pool`, at most `width` in flight (so that a broken pool takes down the
    exams that were running, not every exam queued behind them). Returns ([], []) when all
    finished, else (exams in flight when the pool broke, exams not started)."""
    queue = list(todo)
    running: dict = {}
    while queue or running:
        try:
            while queue and len(running) < width:
                running[pool.submit(_guarded, *args[queue[0]])] = queue[0]
                queue.pop(0)
        except BrokenProcessPool:
            pass  # the futures in flight fail with it: sorted out below
        if not running:
            return [], queue
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        if any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
            wait(running)  # a broken pool fails every future it held
            suspects = []
            for f, i in running.items():
                if f.exception() is None:
                    done(i, f.result())
                else:
                    suspects.append(i)
            return suspects, queue
        for f in finished:
            done(running.pop(f), f.result())
    return [], queue


def _stores_not_in(dst: Path, keep: set[str]) -> list[Path]:
    """The qsnet exam stores under DST whose path is not in ``keep``."""
    from ingest.store import _looks_like_qsnet_store

    return [p for p in sorted(dst.glob("*/*.zarr"))
            if str(p.relative_to(dst)) not in keep and not p.is_symlink() and p.is_dir()
            and _looks_like_qsnet_store(p)]


def _prune(dst: Path, keep: set[str]) -> list[Path]:
    """Remove the stores under DST whose exams are not in SRC (`keep`: the store path of every
    exam of this run). Only qsnet exam stores are touched. A store is first renamed to a hidden
    temporary name and then deleted: a crash midway leaves a hidden leftover (removed by a later
    run), never half a store at the store's path for a later run to take as unchanged."""
    from ingest.store import _fsync_path, _is_stale, _temp_name

    gone = []
    for p in _stores_not_in(dst, keep):
        doomed = _temp_name(p, "old")
        os.rename(p, doomed)
        _fsync_path(p.parent, directory=True)
        shutil.rmtree(doomed, ignore_errors=True)
        gone.append(p)
    for p in dst.glob("*/.*.zarr.old-*"):
        if _is_stale(p):
            shutil.rmtree(p, ignore_errors=True)
    return gone


def _previous_rows(manifest: Path) -> dict[str, dict]:
    """Rows of the last manifest, by path; none if it is missing or unreadable (then all is redone)."""
    from dataclasses import asdict

    from ingest.manifest import read_manifest

    if not manifest.exists():
        return {}
    try:
        return {r.path: asdict(r) for r in read_manifest(manifest)}
    except (ValueError, OSError):
        return {}


def _guarded(src, dst, job, site_cfg, key, fractions, prev_rows=None) -> dict:
    """An exam that fails as a whole quarantines its own files; the batch goes on."""
    try:
        return ingest_exam(src, dst, job, site_cfg, key, fractions, prev_rows)
    except Exception as exc:  # noqa: BLE001
        return _quarantined(Path(src), job, f"{job.exam_dir}: exam failed ({exc.__class__.__name__}: {exc})")
