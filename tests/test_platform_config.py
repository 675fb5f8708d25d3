"""platform/: the image, the Ray cluster config, the KubeRay manifests and the runtime_env are checked
with the tools that will consume them (Ray's launcher validation, Ray Serve's config schema, the
qsnet CLI's own parser, Ray's working-dir packager), without starting any cluster."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
CLUSTER = PLATFORM / "cluster.yaml"
RAYJOB = PLATFORM / "kuberay" / "rayjob.yaml"
RAYSERVICE = PLATFORM / "kuberay" / "rayservice.yaml"
RUNTIME_ENV = PLATFORM / "runtime_env.yaml"
DOCKERFILE = PLATFORM / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# What a cluster must change in platform/serve.yaml, and nothing else (see rayservice.yaml's header).
SERVE_OVERRIDES = {
    ("http_options", "host"): "0.0.0.0",
    ("applications", 0, "args", "models"): "s3://qsnet/models",
    ("applications", 0, "deployments", "Synthesizer", "ray_actor_options", "num_gpus"): 1,
}


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ray_pin() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([^"]+)"', text).group(1)


# ---- cluster.yaml: the checks `ray up` makes before it talks to the cloud ----------------------------

def _launcher_checks(config: dict) -> dict:
    """What `ray up` runs on the file before any cloud call (ray.autoscaler._private.commands.
    _bootstrap_config): defaults merged, setup commands merged, docker and worker counts checked,
    then the JSON schema (ray/autoscaler/ray-schema.json) and the cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_config_passes_ray_launcher_validation():
    config = yaml.safe_load(CLUSTER.read_text())
    prepared = _launcher_checks(config)

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    assert prepared["provider"]["type"] == "aws"
    # the image holds everything: nothing is installed at node start, nothing is copied in
    assert prepared["setup_commands"] == prepared["head_setup_commands"] == prepared["worker_setup_commands"] == []
    assert prepared["file_mounts"] == {}
    assert prepared["docker"]["image"].endswith("-cpu")
    assert all(t["docker"]["worker_image"].endswith("-cuda") for t in gpu)


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(head_nodes={"InstanceType": "m5.large"}), "ValidationError"),   # unknown top-level key
    (lambda c: c.pop("provider"), "KeyError"),                                         # no provider at all
    (lambda c: c["available_node_types"]["gpu"].pop("resources"), "ValidationError"),  # node type w/o resources
    (lambda c: c["available_node_types"]["gpu"].update(min_workers=9), "ValueError"),  # min_workers > max_workers
    (lambda c: c.update(head_node_type="nope"), "ValueError"),
])
def test_cluster_config_validation_can_fail(breakage, error):
    """The same checks reject a broken copy, so the test above can fail."""
    config = yaml.safe_load(CLUSTER.read_text())
    breakage(config)
    with pytest.raises(Exception) as info:
        _launcher_checks(config)
    assert type(info.value).__name__ == error, info.value


@pytest.mark.slow
def test_cluster_config_bootstraps_on_mocked_aws(tmp_path, monkeypatch):
    """The rest of `ray up`'s preparation, against moto's AWS: IAM role, key pair, security group,
    subnets, and node resources detected from the EC2 instance types. The resources this file
    declares (so that it validates without calling AWS) must be what AWS reports."""
    pytest.importorskip("moto")
    from moto import mock_aws

    monkeypatch.setenv("HOME", str(tmp_path))           # Ray writes the new key pair to ~/.ssh
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # Ray attaches AWS-managed policies
    config = yaml.safe_load(CLUSTER.read_text())
    undeclared = copy.deepcopy(config)
    for node_type in undeclared["available_node_types"].values():
        node_type["resources"] = {}      # as Ray's defaults have it: detected from the instance type
    with mock_aws():
        from ray.autoscaler._private.aws import config as aws_config
        from ray.autoscaler._private.commands import _bootstrap_config

        monkeypatch.setattr(aws_config.time, "sleep", lambda s: None)  # IAM propagation waits: not on moto
        resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
        detected = _bootstrap_config(undeclared, no_config_cache=True)
    for name, declared in config["available_node_types"].items():
        node = resolved["available_node_types"][name]["node_config"]
        assert node["SubnetIds"] and node["SecurityGroupIds"] and node["KeyName"]
        aws = detected["available_node_types"][name]["resources"]
        if name == config["head_node_type"]:
            assert aws.get("GPU", 0) == declared["resources"].get("GPU", 0) == 0
        else:
            assert {r: aws.get(r, 0) for r in ("CPU", "GPU")} == declared["resources"], name
    assert detected["available_node_types"]["gpu"]["resources"].get("accelerator_type:A10G") == 1


# ---- KubeRay -----------------------------------------------------------------------------------------

def _groups(cluster_spec: dict) -> tuple[dict, list[dict]]:
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [(g, g["template"]["spec"]["containers"][0]) for g in cluster_spec["workerGroupSpecs"]]
    return head, workers


def _check_cluster_spec(cluster_spec: dict) -> None:
    assert cluster_spec["rayVersion"] == _ray_pin()
    head, workers = _groups(cluster_spec)
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    assert head["image"].endswith("-cpu")
    gpu = [(g, c) for g, c in workers if c["resources"]["limits"].get("nvidia.com/gpu") == 1]
    assert gpu, "a worker group with nvidia.com/gpu: 1 in its limits"
    for g, c in gpu:
        assert c["image"].endswith("-cuda") and g["maxReplicas"] >= g["minReplicas"]
    for c in [head] + [c for _, c in workers]:
        env = {e["name"]: e for e in c.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"], name
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


def _entrypoints(path: Path) -> list[str]:
    """spec.entrypoint of every RayJob, and the `entrypoint:` lines of the file's comments."""
    found = [d["spec"]["entrypoint"] for d in _yaml_docs(path) if d.get("kind") == "RayJob"]
    found += re.findall(r"^\s*#\s*entrypoint:\s*(.+?)\s*$", path.read_text(), re.M)
    return found


def _qsnet_cli():
    """The `qsnet` click group as the installed CLI builds it (its own commands plus the
    `qsnet.commands` entry points), on a fresh Typer app so ingest.cli's global stays untouched."""
    from importlib.metadata import entry_points

    import typer
    import typer.main

    import ingest.cli

    app = typer.Typer()
    app.registered_commands = list(ingest.cli.app.registered_commands)
    app.registered_groups = list(ingest.cli.app.registered_groups)
    for ep in entry_points(group="qsnet.commands"):
        ep.load()(app)
    return typer.main.get_command(app)


def _parse(cli, command_line: str) -> dict:
    """Parse a `qsnet ...` command line with the CLI's own parser, without running the command:
    an unknown subcommand, an unknown flag or a bad value raises here."""
    argv = shlex.split(command_line)
    assert argv[0] == "qsnet", command_line
    assert "--help" not in argv
    sub = cli.commands.get(argv[1])
    assert sub is not None, f"no `qsnet {argv[1]}` subcommand"
    with sub.make_context(f"qsnet {argv[1]}", argv[2:]) as ctx:
        return dict(ctx.params)


def test_rayjob_entrypoints_parse_with_the_qsnet_cli():
    jobs = [d for d in _yaml_docs(RAYJOB) if d.get("kind") == "RayJob"]
    assert jobs and all(d["apiVersion"] == "ray.io/v1" for d in jobs)
    for job in jobs:
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        _check_cluster_spec(job["spec"]["rayClusterSpec"])
    cli = _qsnet_cli()
    entrypoints = _entrypoints(RAYJOB)
    assert {shlex.split(e)[1] for e in entrypoints} >= {"pretrain", "finetune", "tune"}
    for line in entrypoints:
        _parse(cli, line)
    pretrain = _parse(cli, jobs[0]["spec"]["entrypoint"])
    assert str(pretrain["stores"]).startswith("s3://") and str(pretrain["storage"]).startswith("s3://")
    # and the parse is a real check (click's NoSuchOption; typer may vendor click, so by message)
    with pytest.raises(Exception, match="No such option: --store"):
        _parse(cli, "qsnet pretrain --store s3://qsnet/stores/prepared")


def test_rayservice_serve_config_is_platform_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    docs = _yaml_docs(RAYSERVICE)
    svc = next(d for d in docs if d.get("kind") == "RayService")
    assert svc["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(svc["spec"]["rayClusterConfig"])

    k8s = yaml.safe_load(svc["spec"]["serveConfigV2"])
    local = yaml.safe_load((PLATFORM / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(k8s)
    ServeDeploySchema.model_validate(local)

    def by_name(doc):  # deployments as a dict, so an override can name one
        for app in doc["applications"]:
            app["deployments"] = {d.pop("name"): d for d in app.get("deployments", [])}
        return doc

    expected, got = by_name(copy.deepcopy(local)), by_name(copy.deepcopy(k8s))
    for path, value in SERVE_OVERRIDES.items():
        node = expected
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    assert got == expected

    # the cluster can hold what Serve asks for: one GPU per Synthesizer replica at its maximum
    _, workers = _groups(svc["spec"]["rayClusterConfig"])
    gpu_pods = sum(g["maxReplicas"] * c["resources"]["limits"].get("nvidia.com/gpu", 0) for g, c in workers)
    synth = got["applications"][0]["deployments"]["Synthesizer"]
    assert gpu_pods >= synth["autoscaling_config"]["max_replicas"] * synth["ray_actor_options"]["num_gpus"]
    # a public bind: the app's API keys come from a Secret, and the app is told the bind address
    head, _ = _groups(svc["spec"]["rayClusterConfig"])
    env = {e["name"]: e for e in head["env"]}
    keys = env["QSNET_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert keys["name"] and not keys.get("optional")
    assert env["QSNET_SERVE_HOST"]["value"] == k8s["http_options"]["host"]


# ---- runtime_env.yaml --------------------------------------------------------------------------------

def test_runtime_env_is_valid_and_keeps_the_working_dir_small(tmp_path):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray.runtime_env import RuntimeEnv

    doc = yaml.safe_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**doc, working_dir=str(REPO))
    assert set(doc) <= {"excludes", "env_vars"}, "code and deps come from the image and the working dir"
    assert all(isinstance(v, str) for v in doc["env_vars"].values())
    assert not [k for k in doc["env_vars"] if re.search(r"KEY|SECRET|TOKEN|PASSWORD|^AWS_", k)]

    # Package this checkout as `ray job submit --working-dir .` would, with only these excludes
    # (not .gitignore, not Ray's defaults: RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 must not change much).
    pkg = tmp_path / "working_dir.zip"
    create_package(str(REPO), pkg, include_gitignore=False, excludes=list(doc["excludes"]))
    size = pkg.stat().st_size
    names = zipfile.ZipFile(pkg).namelist()
    assert size < 20 * 2**20 and size < GCS_STORAGE_MAX_SIZE, f"working dir package is {size / 2**20:.1f} MiB"
    big = ("data/", "stores/", "runs/", "models/", "reports/", ".venv/", ".git/", ".dvc/cache/",
           "benchmarks/results/")
    assert not [n for n in names if n.startswith(big) or "__pycache__/" in n]
    assert {"pyproject.toml", "params.yaml", "ingest/cli.py", "train/cli.py", "serve/app.py"} <= set(names)
    if (REPO / "tuned" / "best.yaml").exists():
        assert "tuned/best.yaml" in names


# ---- the image ---------------------------------------------------------------------------------------

def test_dockerfile_and_dockerignore():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert re.search(r"^ARG BASE=python:3\.11", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    torch_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install .*torch==2\.13\.0", ln))
    project_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install \.(\s|$)", ln))
    assert torch_at < project_at, "torch first, or `pip install .` pulls PyPI's CUDA torch into the CPU image"
    assert re.search(r'torch==([^"\s]+)', lines[torch_at]).group(1) in (REPO / "pyproject.toml").read_text()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert any(ln.startswith("WORKDIR ") for ln in lines) and lines[-1].startswith("CMD ")
    assert not any(ln.startswith("ENTRYPOINT") for ln in lines)

    ignored = {ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "data", "stores", "runs", "models", "reports", ".git", ".dvc/cache",
            "benchmarks/results"} <= ignored
    # ... but nothing the Dockerfile copies
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for src in copied.split():
            assert src not in ignored and src.split("/")[0] not in ignored, src


def _docker_answers() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    try:
        subprocess.run(["docker", "info"], capture_output=True, check=True, timeout=30)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"the docker daemon does not answer ({exc.__class__.__name__})"
    return None


@pytest.mark.slow
def test_dockerfile_builds_cpu_variant():
    reason = _docker_answers()
    if reason:
        pytest.skip(f"{reason}: the image build is checked where docker runs")
    tag = "qsnet:test-platform-cpu"
    build = subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(REPO)],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-4000:]
    try:
        run = subprocess.run(["docker", "run", "--rm", tag], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "pretrain" in run.stdout and "serve" in run.stdout, run.stderr
        # what KubeRay and the Ray launcher rely on: a non-root user, and `ray`/`qsnet`/`wget` on the
        # PATH of a login shell
        probe = "id -u; command -v ray qsnet wget rsync ssh; python -c 'import torch; print(torch.__version__)'"
        run = subprocess.run(["docker", "run", "--rm", tag, "bash", "-lc", probe],
                             capture_output=True, text=True, timeout=300)
        out = run.stdout.split()
        assert run.returncode == 0 and out[0] != "0" and len(out) == 7 and out[-1].endswith("+cpu"), run.stdout
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


# ---- no credentials anywhere in platform/ ------------------------------------------------------------

CREDENTIAL_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),                                   # AWS access key ids
    re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}", re.I),   # a secret key's value
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _credential_findings(path: Path, text: str) -> list[str]:
    found = [f"{path.name}: {p.pattern}" for p in CREDENTIAL_PATTERNS if p.search(text)]
    # in Kubernetes manifests a secret-looking variable must come from a Secret, never a literal value
    for doc in (yaml.safe_load_all(text) if path.suffix in (".yaml", ".yml") else []):
        for env in _env_lists(doc):
            for e in env:
                if re.search(r"KEY|SECRET|TOKEN|PASSWORD", e.get("name", "")) and "value" in e:
                    found.append(f"{path.name}: {e['name']} has a literal value")
    return found


def _env_lists(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                yield v
            else:
                yield from _env_lists(v)
    elif isinstance(node, list):
        for v in node:
            yield from _env_lists(v)


def test_platform_files_hold_no_credentials():
    files = [p for p in PLATFORM.rglob("*") if p.is_file()] + [DOCKERIGNORE]
    assert {CLUSTER, RAYJOB, RAYSERVICE, RUNTIME_ENV, DOCKERFILE} <= set(files)
    findings = [f for p in files for f in _credential_findings(p, p.read_text())]
    assert not findings, findings
    # the checks can fail: a key id, a secret key in a config, a literal secret in a manifest
    fake_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert _credential_findings(Path("x.yaml"), f"key: {fake_id}\n")
    assert _credential_findings(Path("x.cfg"), "aws_secret_access_key = " + "abcdEFGH1234/xyz+0\n")
    bad = copy.deepcopy(_yaml_docs(RAYSERVICE)[0])
    head = bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]
    assert _credential_findings(Path("x.yaml"), yaml.safe_dump(bad))
