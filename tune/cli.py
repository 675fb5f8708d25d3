"""`qsnet tune` (registered through the `qsnet.commands` entry point)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from ingest.cli import _run, fail

    @app.command("tune")
    def tune_command(
        stores: str = typer.Option("stores/prepared", "--stores", help="Prepared stores (from `qsnet prepare`), a "
                                   "folder or an s3:// URL; trials train on site A's training split and are ranked on "
                                   "its validation split."),
        out: str = typer.Option("tuned", "--out", help="Folder for best.yaml, the best configuration as train "
                                 "params (`qsnet pretrain --tuned tuned/best.yaml`)."),
        reports: str = typer.Option("reports/tune", "--reports", help="Trials table (CSV), summary and Optuna's "
                                     "figures."),
        storage: str = typer.Option("runs/tune", "--storage", help="Experiment folders (Ray Tune's, the Optuna "
                                     "journal, the trials' checkpoints), one per search; kept for --resume. A folder "
                                     "every node sees (the Optuna journal is a file)."),
        params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file; its `tune` section (search "
                                    "space, trials, resources) and `train` section are read."),
        profile: str | None = typer.Option(None, "--profile", help="Profile instead of the file's `profile`."),
        resume: bool = typer.Option(False, "--resume", help="Only continue the interrupted search of these params "
                                    "in --storage (finished trials are kept, the rest run); no such search is an "
                                    "error. Without it a search of these params is continued too."),
        fresh: bool = typer.Option(False, "--fresh", help="Start a new search even when --storage holds a "
                                   "finished or unfinished one of these params (it is set aside, not deleted)."),
        enable: bool = typer.Option(False, "--enable", help="Search even when params say tune.enabled: false."),
    ):
        """Search QS-Net's training hyperparameters with Ray Tune (Optuna TPE, ASHA early stopping) and write the
        best configuration, which the pretrain and finetune stages can take as their params. A finished search of
        the same params in --storage is reused (nothing trained), an unfinished one continued, one of other
        params set aside for a new one."""
        from ingest.params import load_params
        from ingest.storage import check_access, is_url, location
        from tune.search import Interrupted, run_search
        from tune.space import tune_config

        # a pathlib.Path would turn s3://b/x into the local folder s3:/b/x: the search writes its
        # outputs with plain file calls, and its storage must be a file system every node sees
        for opt, val in (("--out", out), ("--reports", reports), ("--storage", storage)):
            if is_url(val):
                fail("tune", f"{opt} {val}: a URL is not supported here; give a folder (for --storage, one "
                             "every node sees, e.g. a shared volume)")
        if resume and fresh:
            fail("tune", "--resume and --fresh contradict each other: give one", 2)
        out, reports, storage = Path(out), Path(reports), Path(storage)
        p = _run("tune", load_params, params, profile)
        if (p.get("tune") or {}).get("enabled") or enable or resume or fresh:
            _run("tune", tune_config, p, _params_file=params)  # a bad space fails before Ray starts
            if not is_url(stores) and not Path(stores).is_dir():
                fail("tune", f"{stores}: no prepared stores (run `qsnet prepare` first)")
            _run("tune", check_access, stores)
        def search():
            try:
                return run_search(p, location(stores), out, reports, storage, resume=resume, fresh=fresh,
                                  force=enable, progress=typer.echo)
            except Interrupted as exc:  # Ctrl-C: Tune saved the state; the conventional exit code
                fail("tune", str(exc), 130)

        summary = _run("tune", search)
        if not summary.get("searched"):
            typer.echo(f"tune: no search (tune.enabled is false); {out / 'best.yaml'} says so")
            return
        for name, b in summary["searches"].items():
            metric = next(k for k in b if k not in ("trial_id", "epochs", "suggested", "train"))
            typer.echo(f"tune: {name}: best {metric} {b[metric]:.5g} (trial {b['trial_id']}, {b['epochs']} epochs)")
        typer.echo(f"tune: {summary['trials']} trials, {summary['stopped_early']} stopped early by ASHA, "
                   f"{summary['errors']} failed; best configuration in {out / 'best.yaml'}")
