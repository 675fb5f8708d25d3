"""`qsnet pretrain`, `qsnet finetune` and `qsnet evaluate` (registered through the `qsnet.commands` entry point)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from ingest.cli import _run, fail

    def make(stage: str, doc: str):
        def command(
            # str, not Path: each may be an fsspec URL (s3://bucket/key), which Path would mangle
            stores: str = typer.Option("stores/prepared", "--stores", help="Prepared stores (from `qsnet prepare`): "
                                       "a folder or a URL (s3://...), read in place."),
            models: str = typer.Option("models", "--models", help="Model registry root: <stage>/<arch>/<contrast>/; "
                                       "a folder or a URL."),
            reports: str = typer.Option("reports/train", "--reports", help="Per-epoch metrics (dvclive); a folder "
                                        "or a URL."),
            storage: str = typer.Option("runs", "--storage", help="Ray Train storage: checkpoints, so an "
                                        "interrupted run resumes. On a cluster: a URL (s3://...) or a path every "
                                        "node sees."),
            params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file; its `train` section is read."),
            profile: Optional[str] = typer.Option(None, "--profile", help="Profile instead of the file's `profile`."),
            tuned: Optional[Path] = typer.Option(None, "--tuned", help="A search's best.yaml (`qsnet tune`): its "
                                                 "values replace the profile's for the architecture it tuned."),
        ):
            from ingest import storage as st
            from ingest.params import load_params
            from train.stages import read_tuned, run_stage, train_config

            p = _run(stage, load_params, params, profile)
            _run(stage, train_config, p, _params_file=params)  # bad params fail before Ray starts
            _run(stage, read_tuned, tuned)
            if not st.is_url(stores) and not Path(stores).is_dir():
                fail(stage, f"{stores}: no prepared stores (run `qsnet prepare` first)")
            loc = {k: st.location(v) for k, v in (("stores", stores), ("models", models), ("reports", reports),
                                                   ("storage", storage))}
            # a URL's cards are written locally first and uploaded at the end: name them then
            cards = _run(stage, run_stage, stage, p, loc["stores"], loc["models"], loc["reports"], loc["storage"],
                         progress=None if st.is_url(models) else (lambda c: typer.echo(f"{stage}: wrote {c}")),
                         tuned=tuned)
            if st.is_url(models):
                for c in cards:
                    typer.echo(f"{stage}: wrote {c}")
            typer.echo(f"{stage}: {len(cards)} model(s) in {st.join(models, stage)}")

        command.__doc__ = doc
        return command

    app.command("pretrain")(make("pretrain", "Train each architecture x contrast of params on site A (healthy) with "
                                 "Ray Train; weights and model cards into models/pretrain/."))
    app.command("finetune")(make("finetune", "Finetune the pretrained models on site B (GBM) with the encoder "
                                 "frozen; weights and model cards into models/finetune/."))

    @app.command("submit", context_settings={"ignore_unknown_options": True})
    def submit_command(
        command: list[str] = typer.Argument(..., help="The stage to run on the cluster, after `--`: e.g. "
                                            "-- qsnet pretrain --stores s3://b/stores/prepared --models s3://b/models"),
        address: Optional[str] = typer.Option(None, "--address", help="The head's dashboard, http://HEAD:8265 "
                                              "(default: $RAY_ADDRESS)."),
        working_dir: Path = typer.Option(Path("."), "--working-dir", help="Uploaded as the job's working "
                                         "directory; the job reads its params file there."),
        runtime_env: Optional[Path] = typer.Option(None, "--runtime-env", help="A runtime_env YAML, e.g. "
                                                   "platform/runtime_env.yaml (excludes, env vars)."),
        wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's log until it ends; the exit "
                                  "status is the job's."),
        submission_id: Optional[str] = typer.Option(None, "--submission-id", help="Job id (default: Ray's)."),
    ):
        """Submit a pipeline stage as a Ray job (`ray job submit`), after checking what can fail early: the
        cluster address, the working directory, the runtime_env, storage credentials, and GPUs the params ask for."""
        from train.submit import preflight, submit

        addr, env, warnings = _run("submit", preflight, address, working_dir, list(command), runtime_env)
        for w in warnings:
            typer.echo(f"qsnet submit: warning: {w}", err=True)
        rc = _run("submit", submit, addr, working_dir, list(command), env, wait=wait, submission_id=submission_id,
                  echo=typer.echo)
        raise typer.Exit(rc)

    @app.command("evaluate")
    def evaluate_command(
        models: str = typer.Option("models", "--models", help="Model registry root: <stage>/<arch>/<contrast>/card.json; "
                                   "a folder or a URL (s3://...)."),
        stores: str = typer.Option("stores/prepared", "--stores", help="Prepared stores; their 'test' split is scored. "
                                   "A folder or a URL."),
        out: str = typer.Option("reports", "--out", help="Report folder: metrics.json, generalisation.json, evaluate/; "
                                "a folder or a URL."),
        params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file; its `evaluate` section is read "
                                    "(a missing file means the paper's defaults: L 4095, K1 0.01, K2 0.03)."),
        profile: Optional[str] = typer.Option(None, "--profile", help="Profile instead of the file's `profile`."),
    ):
        """Score every model card on the test subjects of the stores: MAE / SSIM / PSNR in the brain, paired
        tests, the generalisation study, the physics baseline, lesion regions; tables, figures, report.html."""
        from ingest import storage as st
        from ingest.params import load_params
        from train.evaluate.service import evaluate

        if not st.is_url(stores) and not Path(stores).is_dir():
            fail("evaluate", f"{stores}: no prepared stores (run `qsnet prepare` first)")
        if not st.is_url(models) and not Path(models).is_dir():
            fail("evaluate", f"{models}: no model registry (run `qsnet pretrain` first)")
        if not params.exists() and profile:
            fail("evaluate", f"{params}: no params file to take profile {profile!r} from")
        p = _run("evaluate", load_params, params, profile) if params.exists() else {}
        for loc, write in ((stores, False), (models, False), (out, True)):
            _run("evaluate", st.check_access, loc, write)
        models_dir = _run("evaluate", st.mirror, models) if st.is_url(models) else Path(models)
        try:
            with st.staged(out) as out_dir:
                res = _run("evaluate", evaluate, models_dir, st.location(stores), out_dir, p, progress=typer.echo)
        finally:
            if st.is_url(models):  # the downloaded copy of the registry
                import shutil

                shutil.rmtree(models_dir, ignore_errors=True)
        for e in res["errors"]:
            typer.echo(f"qsnet evaluate: {e}", err=True)
        failed = [c for c in res["checks"] if not c["passed"]]
        typer.echo(f"evaluate: {res['rows']} scores, {len(res['checks']) - len(failed)}/{len(res['checks'])} checks "
                   f"passed, report in {st.join(out, 'evaluate', 'report.html')}")
