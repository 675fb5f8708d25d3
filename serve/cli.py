"""`qsnet serve` (registered through the `qsnet.commands` entry point)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ingest import first_line


def load_config(path: Path) -> dict:
    """The first application of a Serve config file: its ``args`` with its ``deployments``
    folded in (as ``serve run`` would apply them), plus the file's ``http_options``."""
    import yaml

    from serve.dicomout import check_uid_root

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the Serve config ({first_line(exc)})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a Serve config (expected a mapping with 'applications')")
    apps = doc.get("applications") or []
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict) \
            or apps[0].get("import_path") != "serve.app:build_app":
        raise ValueError(f"{path}: needs an application with import_path serve.app:build_app")
    if not isinstance(apps[0].get("args") or {}, dict):
        raise ValueError(f"{path}: the application's args must be a mapping")
    args = dict(apps[0].get("args") or {})
    keys = args.get("api_keys")
    if keys is not None and not (isinstance(keys, str) or (isinstance(keys, list) and all(isinstance(k, str) for k in keys))):
        raise ValueError(f"{path}: api_keys must be a list of strings")
    try:
        check_uid_root(args.get("uid_root"))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(doc.get("http_options") or {}, dict):
        raise ValueError(f"{path}: http_options must be a mapping")
    deps = {}
    for d in apps[0].get("deployments") or []:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ValueError(f"{path}: each deployment must be a mapping with a name")
        deps[d["name"]] = {k: v for k, v in d.items() if k != "name"}
    if deps:
        args["deployments"] = deps
    return {"args": args, "http_options": doc.get("http_options") or {}}


def register(app: typer.Typer) -> None:
    from ingest.cli import fail

    @app.command("serve")
    def serve_command(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs API keys "
                                 "($QSNET_API_KEYS or api_keys in --config)."),
        port: int = typer.Option(8000, "--port", help="HTTP port."),
        models: Optional[str] = typer.Option(None, "--models", help="Model registry folder or URL (`models/`, from pretrain and "
                                    "finetune); default: the config's, else models/."),
        config: Path = typer.Option(None, "--config", help="A Serve config (platform/serve.yaml): its application "
                                    "args and deployment options (replicas, autoscaling, resources)."),
    ):
        """Serve the models over HTTP with Ray Serve: POST a zip of an exam's MRF DICOM to /v1/synthesize, get the
        five contrasts back as DICOM; a viewer at /. Runs the app locally, as `serve run` would."""
        import os
        import signal
        import time

        from serve.app import api_keys, build_app, check_bind

        try:
            cfg = load_config(config) if config else {"args": {}, "http_options": {}}
            args = {**cfg["args"], "host": host}
            if models is not None:
                args["models"] = str(models)
            args.setdefault("models", "models")
            check_bind(host, api_keys(args.get("api_keys")))
            application = build_app(args)
        except (ValueError, OSError) as exc:  # OSError: a missing folder, an unreachable s3:// registry
            fail("serve", str(exc))
        import ray
        from ray import serve

        if not ray.is_initialized():
            # RAY_ADDRESS joins that cluster; otherwise a private local one, never whatever
            # `ray start` cluster happens to run on this machine
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=True,
                     configure_logging=False)
        serve.start(http_options={**cfg["http_options"], "host": host, "port": port})
        serve.run(application, name="qsnet", route_prefix="/", blocking=False)
        if not api_keys(args.get("api_keys")):
            typer.echo("serve: no API keys configured: open to anyone on this machine (loopback only)")
        typer.echo(f"serve: ready on http://{host}:{port}/ (viewer), POST /v1/synthesize, docs at /docs; "
                   "Ctrl-C stops")
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        serve.shutdown()
        ray.shutdown()
        os._exit(0)  # Ray's atexit hooks can block on a second Ctrl-C; everything is shut down already
