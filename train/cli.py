"""`qsnet pretrain`, `qsnet finetune` and `qsnet evaluate` (registered through the `qsnet.commands` entry point)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from ingest.cli import _run, fail

    def make(stage: str, doc: str):
        def command(
            stores: Path = typer.Option(Path("stores/prepared"), "--stores", help="Prepared stores (from `qsnet prepare`)."),
            models: Path = typer.Option(Path("models"), "--models", help="Model registry root: <stage>/<arch>/<contrast>/."),
            reports: Path = typer.Option(Path("reports/train"), "--reports", help="Per-epoch metrics (dvclive)."),
            storage: Path = typer.Option(Path("runs"), "--storage", help="Ray Train storage: checkpoints, so an "
                                         "interrupted run resumes. On a cluster: a path every node sees."),
            params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file; its `train` section is read."),
            profile: Optional[str] = typer.Option(None, "--profile", help="Profile instead of the file's `profile`."),
            tuned: Optional[Path] = typer.Option(None, "--tuned", help="A search's best.yaml (`qsnet tune`): its "
                                                 "values replace the profile's for the architecture it tuned."),
        ):
            from ingest.params import load_params
            from train.stages import read_tuned, run_stage, train_config

            p = _run(stage, load_params, params, profile)
            _run(stage, train_config, p)  # bad params fail before Ray starts
            _run(stage, read_tuned, tuned)
            if not stores.is_dir():
                fail(stage, f"{stores}: no prepared stores (run `qsnet prepare` first)")
            cards = _run(stage, run_stage, stage, p, stores, models, reports, storage,
                         progress=lambda c: typer.echo(f"{stage}: wrote {c}"), tuned=tuned)
            typer.echo(f"{stage}: {len(cards)} model(s) in {models / stage}")

        command.__doc__ = doc
        return command

    app.command("pretrain")(make("pretrain", "Train each architecture x contrast of params on site A (healthy) with "
                                 "Ray Train; weights and model cards into models/pretrain/."))
    app.command("finetune")(make("finetune", "Finetune the pretrained models on site B (GBM) with the encoder "
                                 "frozen; weights and model cards into models/finetune/."))

    @app.command("evaluate")
    def evaluate_command(
        models: Path = typer.Option(Path("models"), "--models", help="Model registry root: <stage>/<arch>/<contrast>/card.json."),
        stores: Path = typer.Option(Path("stores/prepared"), "--stores", help="Prepared stores; their 'test' split is scored."),
        out: Path = typer.Option(Path("reports"), "--out", help="Report folder: metrics.json, generalisation.json, evaluate/."),
        params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file; its `evaluate` section is read "
                                    "(a missing file means the paper's defaults: L 4095, K1 0.01, K2 0.03)."),
        profile: Optional[str] = typer.Option(None, "--profile", help="Profile instead of the file's `profile`."),
    ):
        """Score every model card on the test subjects of the stores: MAE / SSIM / PSNR in the brain, paired
        tests, the generalisation study, the physics baseline, lesion regions; tables, figures, report.html."""
        from ingest.params import load_params
        from train.evaluate.service import evaluate

        if not stores.is_dir():
            fail("evaluate", f"{stores}: no prepared stores (run `qsnet prepare` first)")
        if not models.is_dir():
            fail("evaluate", f"{models}: no model registry (run `qsnet pretrain` first)")
        if not params.exists() and profile:
            fail("evaluate", f"{params}: no params file to take profile {profile!r} from")
        p = _run("evaluate", load_params, params, profile) if params.exists() else {}
        res = _run("evaluate", evaluate, models, stores, out, p, progress=typer.echo)
        for e in res["errors"]:
            typer.echo(f"qsnet evaluate: not evaluated: {e}", err=True)
        failed = [c for c in res["checks"] if not c["passed"]]
        typer.echo(f"evaluate: {res['rows']} scores, {len(res['checks']) - len(failed)}/{len(res['checks'])} checks "
                   f"passed, report in {out / 'evaluate' / 'report.html'}")
