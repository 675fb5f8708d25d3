"""`qsnet submit`: `ray job submit` for the pipeline's stages, checked before anything is sent.

A job that cannot work should fail on the user's terminal in seconds, not as a pending or
crashed job on the cluster: the dashboard address is probed, the working directory and the
runtime_env are checked, every ``s3://`` location of the command is checked with the caller's
credentials, and params that ask for GPUs are checked against the cluster's nodes. Then the job
goes through Ray's own Jobs API (``JobSubmissionClient``), so ``ray job logs / status / stop``
work on it as on any Ray job.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import urllib.error
import urllib.request
from pathlib import Path

from ingest import first_line

__all__ = ["SubmitError", "preflight", "submit", "STAGE_COMMANDS"]

# qsnet subcommands that make sense as a cluster job
STAGE_COMMANDS = {"pretrain", "finetune", "tune", "evaluate", "prepare"}
# per stage, the parameters that name what it writes and what it reads (their defaults are
# locations too: relative ones, in the job's temporary copy of the working dir)
_TRAIN_WRITES = ("models", "reports", "storage")
WRITES = {"pretrain": _TRAIN_WRITES, "finetune": _TRAIN_WRITES, "tune": ("out", "reports", "storage"),
          "evaluate": ("out",), "prepare": ("dst", "report", "figures")}
READS = {"pretrain": ("stores",), "finetune": ("stores", "models"), "tune": ("stores",),
         "evaluate": ("models", "stores"), "prepare": ("src",)}
PROBE_TIMEOUT_S = 5.0
# never uploaded with the working dir, whatever --runtime-env says (or when none is given): Ray
# zips the folder into the cluster's GCS, readable by every job there. gitignore-style patterns.
SECRET_EXCLUDES = (".git", ".env", ".env.*", "*.env", ".aws/", "credentials", ".netrc", "id_rsa*", "*.pem",
                   "*.key", "/.dvc/config.local")
# and, without a runtime_env file, never the bulky folders (platform/runtime_env.yaml lists the
# same): .gitignore alone keeps them out, and only where Ray reads it (not for data-paper/, say)
BULK_EXCLUDES = ("/data", "/data-*", "/stores", "/runs", "/models", "/reports", "/benchmarks/results", "/.venv",
                 "/.dvc/cache", "/.dvc/tmp", "/.whl", "*.whl", "__pycache__")
AGENT_WAIT_S = 180.0


class SubmitError(ValueError):
    pass


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the head's dashboard) "
                          "or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise SubmitError(f"{address}: a Ray Client address; jobs go to the dashboard, http://HEAD:8265")
    if address == "auto":  # Ray's "the cluster on this machine": its dashboard's default port
        address = "http://127.0.0.1:8265"
    if address.rstrip("/").endswith(":6379") or address.rstrip("/").endswith(":10001"):
        raise SubmitError(f"{address}: the cluster's GCS or Ray Client port; jobs go to the dashboard, "
                          "--address http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def probe(address: str) -> dict:
    """The dashboard's version answer, or a one-line error in PROBE_TIMEOUT_S, never a hang."""
    try:  # the same token Ray's own job client would send (RAY_AUTH_TOKEN, ~/.ray/auth_token)
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        headers = dict(get_auth_headers_if_auth_enabled({}))
    except Exception:  # noqa: BLE001 - a private helper: without it, the probe goes unauthenticated
        headers = {}
    req = urllib.request.Request(f"{address}/api/version", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SubmitError(f"{address}: the Ray dashboard refused the request (HTTP {exc.code}): the cluster "
                              "uses token authentication; set RAY_AUTH_MODE=token and the cluster's token "
                              "(RAY_AUTH_TOKEN, or ~/.ray/auth_token) here") from None
        raise SubmitError(f"{address}: cannot reach a Ray dashboard (HTTP {exc.code} {exc.reason}: something "
                          "else answers there)") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise SubmitError(f"{address}: cannot reach a Ray dashboard ({why}); is the head running "
                          "(`ray start --head --dashboard-host=...`) and the address right?") from None


def read_runtime_env(path: Path | None) -> dict:
    from ingest.params import ParamsError, read_mapping

    if path is None:
        return {"excludes": list(BULK_EXCLUDES + SECRET_EXCLUDES)}
    path = Path(path)
    try:
        doc = read_mapping(path, "runtime_env")
    except ParamsError as exc:
        raise SubmitError(str(exc)) from None
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**doc)
    except Exception as exc:  # noqa: BLE001 - Ray raises TypeError/ValueError/its own
        raise SubmitError(f"{path}: not a valid runtime_env ({first_line(exc)})") from None
    if "working_dir" in doc:
        raise SubmitError(f"{path}: give the working directory with --working-dir, not in the runtime_env")
    excludes = list(doc.get("excludes") or [])
    return {**doc, "excludes": excludes + [p for p in SECRET_EXCLUDES if p not in excludes]}


def _parsed(command: list[str]):
    """The stage command as its own CLI parses it: ``(click context, {param name: label})``, so
    flags, ``-j 2`` and positionals are read as they will be in the job."""
    import typer

    from ingest import cli

    commands = typer.main.get_command(cli.app).commands
    if command[1] not in commands:  # the train and tune commands come from entry-point plugins
        cli._load_plugins()
        commands = typer.main.get_command(cli.app).commands
    cmd = commands[command[1]]
    try:
        ctx = cmd.make_context(command[1], list(command[2:]))
    except Exception as exc:  # noqa: BLE001 - click's UsageError (typer may vendor its own click)
        # a misspelt option found here, not after the upload when the job dies with exit code 2
        # (and an option after it no longer reads as its default in the checks below)
        why = exc.format_message() if hasattr(exc, "format_message") else first_line(exc)
        raise SubmitError(f"{shlex.join(command)}: {why}") from None
    # typer may bring its own click: options told apart by their dashes, not by class
    labels = {p.name: (p.opts[0] if p.opts and p.opts[0].startswith("-") else p.name.upper()) for p in cmd.params}
    return ctx, labels


def _stage_locations(stage: str, ctx, labels: dict) -> list[tuple[str, str, bool, bool]]:
    """(label, value, written, defaulted) for each location the stage reads or writes, from its
    parsed command (:func:`_parsed`)."""
    out = []
    for table, written in ((WRITES, True), (READS, False)):
        for name in table.get(stage, ()):
            val = ctx.params.get(name)
            if val is not None and str(val):
                out.append((labels[name], str(val), written, getattr(ctx.get_parameter_source(name), "name", "") == "DEFAULT"))
    return out


def cluster_gpus(address: str) -> int:
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, timeout=int(PROBE_TIMEOUT_S) * 2)
    except Exception as exc:  # noqa: BLE001
        raise SubmitError(f"{address}: cannot list the cluster's nodes ({first_line(exc)})") from None
    return sum(int(n.resources_total.get("GPU", 0)) for n in nodes if n.state == "ALIVE")


def preflight(address: str | None, working_dir: Path, command: list[str], runtime_env: Path | None = None,
              params: str = "params.yaml", profile: str | None = None) -> tuple[str, dict, list[str]]:
    """Everything checkable before the job exists: ``(dashboard address, runtime_env, warnings)``."""
    from ingest import storage

    warnings: list[str] = []
    working_dir = Path(working_dir)
    if not working_dir.is_dir():
        raise SubmitError(f"{working_dir}: working directory does not exist")
    if not command or command[0] != "qsnet" or len(command) < 2 or command[1] not in STAGE_COMMANDS:
        raise SubmitError(f"command {shlex.join(command) or '(none)'!r}: submit one of "
                          f"{', '.join(f'qsnet {c}' for c in sorted(STAGE_COMMANDS))}")
    env = read_runtime_env(runtime_env)
    # params are read in the job's working directory: check the same file here
    ctx, labels = _parsed(command)
    params_file = working_dir / str(ctx.params.get("params") or params)
    profile = ctx.params.get("profile") or profile
    if not params_file.is_file() and command[1] != "evaluate":
        raise SubmitError(f"{params_file}: no params file in the working directory (the job reads it there)")
    # what this job's working dir will not carry (a runtime_env may ship stores/ on purpose)
    bulk = {p.strip("/").split("/")[0] for p in env["excludes"] if p.startswith("/") and "*" not in p}
    for opt, val, written, defaulted in _stage_locations(command[1], ctx, labels):
        what = f"{opt} {val}" + (" (the default)" if defaulted else "")
        if storage.is_url(val) and written and command[1] in ("tune", "prepare"):
            # the search writes its outputs and Optuna's journal, prepare its stores, with plain file calls
            raise SubmitError(f"{opt} {val}: qsnet {command[1]} writes to folders, not URLs; give a folder every "
                              "node sees (a shared volume)")
        if storage.is_url(val):
            # with the submitter's credentials, which the workers should share (platform/README.md):
            # an output the job cannot write fails after hours of training, an input that is not
            # there once the job starts
            try:
                storage.check_access(val, write=written)
                missing = not written and not storage.exists(val)
            except storage.StorageError as exc:
                raise SubmitError(f"{opt} {exc}") from None
            except Exception as exc:  # noqa: BLE001 - botocore/aiohttp raise many kinds for one cause
                raise SubmitError(f"{opt} {val}: storage not reachable ({first_line(exc)})") from None
            if missing:
                raise SubmitError(f"{what}: nothing there to read (check the path; `qsnet prepare` and the "
                                  "stages upload to it)")
        elif written and not Path(val).is_absolute():
            where = "an absolute folder every node sees" if command[1] in ("tune", "prepare") else "an s3:// URL"
            warnings.append(f"{what}: a relative path lands in the job's temporary copy of the working "
                            f"directory on the head node, and goes with it; on a cluster give {where}")
        elif not written and not Path(val).is_absolute() and Path(val).parts[:1] and Path(val).parts[0] in bulk:
            raise SubmitError(f"{what}: a local folder the job cannot read: {Path(val).parts[0]}/ is never "
                              "uploaded with the working directory; give an s3:// URL (platform/README.md), or an "
                              "absolute folder every node sees")
    address = dashboard_address(address)
    probe(address)
    if command[1] in ("pretrain", "finetune") and params_file.is_file():
        from ingest.params import load_params
        from train.stages import DEFAULTS

        p = load_params(params_file, profile)
        train = {**DEFAULTS, **(p.get("train") or {})}
        if train["use_gpu"] is True:
            need = int(train["num_workers"])
            have = cluster_gpus(address)
            if have < need:
                raise SubmitError(f"{params_file}: train.use_gpu asks for {need} GPU worker(s), the cluster at "
                                  f"{address} has {have} GPU(s) now (set use_gpu: auto or false, or start GPU nodes)")
    return address, env, warnings


def submit(address: str, working_dir: Path, command: list[str], runtime_env: dict, wait: bool = True,
           submission_id: str | None = None, echo=print) -> int:
    """Submit; with ``wait``, stream the job's log and return its exit status: 0 if it SUCCEEDED,
    else its driver's own (1 where Ray has none)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job = client.submit_job(entrypoint=shlex.join(command), submission_id=submission_id,
                                    runtime_env={**runtime_env, "working_dir": str(Path(working_dir).resolve())})
            break
        except RuntimeError as exc:
            # a head that has just started answers before its job agent is up
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise SubmitError(f"{address}: job not accepted ({str(exc).strip().splitlines()[-1]})") from None
            time.sleep(2)
    echo(f"submit: job {job} on {address}")
    echo(f"submit: follow with `ray job logs -f {job} --address {address}`, stop with "
         f"`ray job stop {job} --address {address}`")
    if not wait:
        return 0
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job):
            echo(lines.rstrip("\n"))

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        echo(f"submit: stopped following; job {job} keeps running (`ray job stop {job}` stops it)")
        return 130
    except Exception as exc:  # noqa: BLE001 - the log stream, not the job: its status decides the exit
        echo(f"submit: lost the job's log stream ({type(exc).__name__}: {str(exc).strip()[:200]}); waiting for "
             f"its status (`ray job logs {job}` shows the rest)")
    try:
        while True:  # the log ends a moment before the status is final (or, lost, hours before)
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(1)
        info = client.get_job_info(job)
    except KeyboardInterrupt:
        echo(f"submit: stopped waiting; job {job} keeps running (`ray job stop {job}` stops it)")
        return 130
    except Exception as exc:  # noqa: BLE001 - the head went away: what is known, in one line
        raise SubmitError(f"{address}: lost the cluster while waiting for job {job} ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                          f"`ray job status {job}` says how it ended") from None
    echo(f"submit: job {job} {status.value}" + (f": {info.message}" if status != JobStatus.SUCCEEDED and
                                                 info.message else ""))
    if status == JobStatus.SUCCEEDED:
        return 0
    # the driver's own status (tune's 130: interrupted, resume it; 2: a usage error), else 1
    code = getattr(info, "driver_exit_code", None)
    if isinstance(code, int) and code < 0:  # killed by a signal (Python's -N): the shell's 128 + N
        return 128 - code
    return code if isinstance(code, int) and code != 0 else 1
