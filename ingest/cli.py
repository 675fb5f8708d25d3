"""The `qsnet` command line.

Commands of this package are defined here; higher packages (train, tune, serve) add theirs
through the `qsnet.commands` entry-point group, so this, the lowest package, never imports them.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

import typer

from ingest import first_line

app = typer.Typer(
    name="qsnet",
    help="QS-Net platform: MRF maps to synthetic clinical contrasts, from DICOM to served models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(command: str, message: str, code: int = 1) -> None:
    """One line on stderr and a non-zero exit: the contract for every error a user can cause."""
    typer.echo(f"qsnet {command}: error: {message}", err=True)
    raise typer.Exit(code)


def _run(command: str, fn, *args, _params_file: Path | None = None, **kwargs):
    """``fn(*args, **kwargs)``, any failure one line; a check of params ("params: ...") names
    ``_params_file``, the file a user has to edit."""
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail(command, "interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        if os.environ.get("QSNET_DEBUG"):
            raise
        msg = first_line(exc)
        if _params_file is not None and msg.startswith("params: "):
            msg = f"{_params_file}: {msg[len('params: '):]}"
        fail(command, msg)


@app.command()
def simulate(
    out: Path = typer.Option(Path("data"), "--out", help="Output folder (written atomically)."),
    size: str = typer.Option("demo", "--size", help="demo (CPU minutes) or paper (Table 1 geometry, 32 + 18 exams)."),
    anatomy: Optional[Path] = typer.Option(None, "--anatomy", help="Folder with gm.nii.gz, wm.nii.gz, csf.nii.gz "
                                           "probability maps on one grid (default: MNI152 2009 from nilearn)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice."),
    site: Optional[list[str]] = typer.Option(None, "--site", help="Only these sites (repeatable): site-A, site-B."),
    subjects: Optional[int] = typer.Option(None, "--subjects", help="At most this many exams per site (a quick look; "
                                            "the default is the size's full cohort)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Exams simulated in parallel (default: CPU count)."),
    force: bool = typer.Option(False, "--force", help="Regenerate even if OUT already holds this exact phantom."),
):
    """Simulate the two phantom sites of the paper as DICOM (site A: Siemens Prisma, healthy;
    site B: GE SIGNA Premier, glioblastoma)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ingest.phantom.simulate import SITES, plan, simulate as run

    sites = tuple(site) if site else SITES
    tasks = _run("simulate", plan, size, sites, subjects)
    with Progress(TextColumn("simulate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), transient=False, disable=not sys.stderr.isatty()) as prog:
        bar = prog.add_task("", total=len(tasks))

        def tick(result):
            prog.update(bar, advance=1, description=f"{result['site']}/{result['exam']}")

        summary = _run("simulate", run, out, size=size, anatomy_dir=anatomy, seed=seed, sites=sites,
                       subjects=subjects, jobs=jobs, force=force, progress=tick)
    if summary["up_to_date"]:
        typer.echo(f"{out}: already holds this phantom (size {size}, seed {seed}); nothing to do (--force regenerates)")
    else:
        typer.echo(f"{out}: wrote {len(summary['exams'])} exams (size {size}, seed {seed})")


@app.command()
def view(
    path: Path = typer.Argument(..., help="An exam folder (one sub-folder per DICOM series)."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
):
    """Mosaic of the middle slice of each series of an exam."""
    from ingest.view import render

    png = _run("view", render, path, out)
    typer.echo(str(png))


@app.command()
def ingest(
    src: Path = typer.Argument(..., help="Input tree: <site>/<exam>/... of DICOM files."),
    dst: Path = typer.Argument(..., help="Store root: one <site>/<subject>.zarr per exam."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest CSV (default: DST/../manifest.csv)."),
    sites: Optional[Path] = typer.Option(None, "--sites", help="Extra site files (*.yaml) besides the built-in ones."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Exams in parallel (default: CPU count)."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any file is quarantined (an exam "
                                "that gives no store quarantines its files)."),
    prune: bool = typer.Option(False, "--prune", help="Delete stores under DST whose exams are no longer in SRC "
                               "(DST then mirrors SRC, as a DVC stage output should); the store of an exam still "
                               "in SRC is kept even when this run wrote none for it."),
):
    """DICOM tree -> de-identified, versioned Zarr stores and a manifest with one row per input file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ingest.service import ingest as run

    with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not sys.stderr.isatty()) as prog:
        bar = prog.add_task("", total=None)

        def tick(_result):
            prog.update(bar, advance=1)

        summary = _run("ingest", run, src, dst, manifest=manifest, sites_dir=sites, jobs=jobs, strict=strict,
                       progress=tick, prune=prune)
    if summary["key_source"] == "development-key":
        typer.echo("qsnet ingest: warning: pseudonyms use the built-in development key; set "
                   "QSNET_PSEUDONYM_KEY before ingesting real patient data", err=True)
    typer.echo(f"{summary['exams']} exams: {summary['written']} written, {summary['unchanged']} unchanged, "
               f"{summary['no_store']} without a store; {summary['files']} files: {summary['ingested']} ingested, "
               f"{summary['quarantined']} quarantined, {summary['ignored']} ignored; manifest {summary['manifest']}"
               + (f"; {summary['pruned']} store(s) of removed exams deleted" if summary.get("pruned") else "")
               + (f"; {summary['kept']} store(s) kept from an earlier run for exams still in SRC that wrote no "
                  "store this run (see their rows)" if summary.get("kept") else "")
               + (f"; {summary['orphans']} store(s) under {dst} belong to no exam in SRC (an exam removed, or its "
                  "PatientID or StudyInstanceUID changed): --prune removes them" if summary.get("orphans") else ""))
    if summary.get("prune_held"):
        typer.echo(f"qsnet ingest: warning: --prune deleted nothing: {summary['prune_held']} file(s) in {src} could "
                   "not be placed in an exam (quarantined in the manifest), and the store of their exam cannot be "
                   "told from one whose exam left SRC", err=True)
    if summary.get("strict_failed"):
        fail("ingest", f"{summary['quarantined']} file(s) quarantined (--strict); see {summary['manifest']}")


@app.command("phantom-qa")
def phantom_qa(
    data: Path = typer.Argument(Path("data"), help="A phantom tree written by `qsnet simulate`."),
    out: Path = typer.Option(Path("reports/phantom_qa.json"), "--out", help="Metrics JSON to write."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero when a physics check fails."),
):
    """Physics QA of a phantom tree: contrasts by ground-truth label, MRF T1/T2 vs 3T literature."""
    import json

    from ingest.phantom.qa import run_qa

    if not data.is_dir():
        fail("phantom-qa", f"{data}: not a folder")
    if not any(data.glob("site-*/*/truth/truth.json")):
        report = {"phantom": False, "note": "no phantom ground truth under this tree; nothing to check"}
    else:
        report = _run("phantom-qa", run_qa, data)
        report["phantom"] = True
        failed = [f"{site}:{name}" for site, c in report["checks"].items() for name, ok in c.items() if not ok]
        report["all_passed"] = not failed
        for f in failed:
            typer.echo(f"qsnet phantom-qa: warning: check failed: {f}", err=True)
    if out.is_dir():
        fail("phantom-qa", f"{out}: is a folder; --out names the report file (e.g. reports/phantom_qa.json)")
    tmp = out.with_suffix(out.suffix + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        tmp.replace(out)
    except OSError as exc:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        fail("phantom-qa", f"{out}: cannot write the report ({exc.strerror or exc})")
    typer.echo(f"{out}: {'all checks passed' if report.get('all_passed', True) else 'some checks failed'}")
    if strict and not report.get("all_passed", True):
        raise typer.Exit(1)


@app.command()
def prepare(
    src: str = typer.Argument("stores/raw", help="Raw exam stores: <site>/<subject>.zarr (from `qsnet ingest`); a "
                              "folder or a URL (s3://...), read in place."),
    dst: str = typer.Argument("stores/prepared", help="Prepared stores, one <site>/<subject>.zarr per exam: a "
                              "folder (upload it to object storage afterwards, see platform/README.md)."),
    report: str = typer.Option("reports/prepare.json", "--report", help="Per-exam report and summary (JSON)."),
    figures: Optional[str] = typer.Option("reports/prepare", "--figures",
                                          help="Registration QA figures, <site>/<subject>.png."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file; its `prepare` section is read."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile to use instead of the file's `profile`."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Exams in parallel (default: CPU count)."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any exam is excluded."),
):
    """Raw stores -> training-ready stores: elastix registration to the MRF T1 map, brain mask,
    resampling onto the MRF grid, resizing, [0, 1] scaling; a report with the reasons for every
    excluded exam."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ingest import storage
    from ingest.params import load_params
    from ingest.prepare import prepare as run
    from ingest.prepare.service import config as prepare_config

    for what, where in (("DST", dst), ("--report", report), ("--figures", figures)):
        # a Path would turn s3://b/x into a local folder "s3:/b/x"
        if where and storage.is_url(where):
            fail("prepare", f"{what} {where}: prepare writes to a folder, not a URL; prepare into a folder and "
                            "upload it (platform/README.md)")
    dst, report, figures = Path(dst), Path(report), Path(figures) if figures else None
    p = _run("prepare", load_params, params, profile)
    _run("prepare", prepare_config, p, _params_file=params)   # bad params fail before any exam is read
    _run("prepare", storage.check_access, src)   # a missing credential: one line naming the URL
    n = len(_run("prepare", storage.list_stores, src)) if storage.is_url(src) or Path(src).is_dir() else None
    with Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not sys.stderr.isatty()) as prog:
        bar = prog.add_task("", total=n)
        rep = _run("prepare", run, src, dst, report, p, jobs=jobs, figures=figures,
                   progress=lambda _r: prog.update(bar, advance=1))
    s = rep["summary"]
    for key, why in sorted(rep["excluded"].items()):
        typer.echo(f"qsnet prepare: excluded {key}: {why}", err=True)
    extra = ""
    if s.get("brain_dice_mean") is not None:
        extra = (f"; phantom brain Dice mean {s['brain_dice_mean']}, registration error mean "
                 f"{s['registration_error_mm_mean']} mm (max {s['registration_error_mm_max']})")
    typer.echo(f"{s['exams']} exams: {s['prepared']} prepared, {s['excluded']} excluded{extra}; report {report}")
    if strict and s["excluded"]:
        fail("prepare", f"{s['excluded']} exam(s) excluded (--strict); see {report}")
    if s["exams"] and not s["prepared"]:
        fail("prepare", f"no exam could be prepared; see {report}")


def _load_plugins() -> None:
    for ep in entry_points(group="qsnet.commands"):
        try:
            ep.load()(app)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
            typer.echo(f"qsnet: warning: command plugin {ep.name!r} failed to load: {exc}", err=True)


def main() -> None:
    _load_plugins()
    app()


if __name__ == "__main__":
    main()
