"""The cluster route on loopback: a Ray head and a worker node started here with `ray start`,
a demo pretrain submitted with `ray job submit --working-dir --runtime-env`, a worker node's
raylet killed mid-training, and the checks `qsnet submit` makes before it sends anything.

The head has no CPUs (as a cluster launcher's head usually has no GPUs): Ray Train's workers
must run on a worker node, so the job really crosses nodes. Both nodes share this machine's
disk, but the job takes absolute paths only because of that; on a cluster they are s3:// URLs
(test_train_s3.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train_ray import site_stores  # noqa: E402

from train import registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = shutil.which("ray", path=str(BIN)) or str(BIN / "ray")
QSNET = str(BIN / "qsnet")
RUNTIME_ENV = REPO / "platform" / "runtime_env.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # a loopback-only cluster that lives for this module: no token (a real cluster keeps Ray's
    # token authentication, see platform/README.md)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _run(cmd, env, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    env: dict
    workers: list = field(default_factory=list)  # node manager ports of the worker nodes started
    temp_dirs: list = field(default_factory=list)

    def add_worker(self, cpus: int = 2) -> int:
        port = _free_port()
        # its own temp dir, as on its own machine: nodes sharing one would share (and garbage-
        # collect) each other's unpacked job working directories
        temp = Path(tempfile.gettempdir()) / f"qsnet-ray-{port}"
        self.temp_dirs.append(temp)
        res = _run([RAY, "start", f"--address={self.gcs}", f"--num-cpus={cpus}", f"--node-manager-port={port}",
                    f"--temp-dir={temp}", "--disable-usage-stats"], self.env, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        self.workers.append(port)
        return port

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard) if n.state == "ALIVE"]

    def raylet_pid(self, node_manager_port: int) -> int:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"raylet") and f"--node_manager_port={node_manager_port}".encode() in cmd:
                return int(proc.name)
        raise AssertionError(f"no raylet with node manager port {node_manager_port}")


def stop_nodes(temp_dirs: list[Path], gcs_port: int | None = None) -> None:
    """Stop this cluster's processes only: `ray stop` would stop every Ray on the machine, a
    user's own cluster or a pipeline's private one included. A node's Ray processes name its
    temp dir on their command line; the agents are their children; the head's client server
    names the GCS port."""
    marks = [str(d).encode() for d in temp_dirs]
    if gcs_port:
        marks.append(f":{gcs_port}\0".encode())
    parent, ours = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes() + b"\0"
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if any(m in cmd for m in marks):
            ours.add(int(proc.name))
    grew = True
    while grew:  # and everything they started
        kids = {p for p, pp in parent.items() if pp in ours} - ours
        ours |= kids
        grew = bool(kids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)
    for d in temp_dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    env = _env()
    port, dash = _free_port(), _free_port()
    temp = Path(tempfile.gettempdir()) / f"qsnet-ray-{port}"
    head = _run([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=true",
                 f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                 "--disable-usage-stats"], env, timeout=180)
    c = Cluster(gcs=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dash}", env=env, temp_dirs=[temp])
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        c.add_worker()
        deadline = time.monotonic() + 120
        while len(c.alive_nodes()) < 2:
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(2)
        yield c
    finally:
        stop_nodes(c.temp_dirs, gcs_port=port)


def _work(tmp_path: Path, epochs: int, **extra) -> Path:
    work = tmp_path / "job"
    work.mkdir()
    lines = ["profile: t", "seed: 0", "t:", "  train:", "    archs: [qsnet]", "    contrasts: [t2w]", "    width: 4",
             f"    epochs: {epochs}", "    batch_size: 2", "    num_workers: 1", "    checkpoint_every: 1"]
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    (work / "params.yaml").write_text("\n".join(lines) + "\n")
    return work


def _stage_args(tmp_path: Path, stores: Path) -> list[str]:
    return ["--stores", str(stores), "--models", str(tmp_path / "models"), "--reports", str(tmp_path / "reports"),
            "--storage", str(tmp_path / "runs")]


@pytest.mark.slow
def test_ray_job_submit_runs_pretrain_on_the_worker_node(cluster, tmp_path):
    stores = site_stores(tmp_path)
    work = _work(tmp_path, epochs=2, use_gpu="auto")
    for _ in range(36):  # the head's job agent comes up seconds (minutes on a busy machine) after `ray start`
        job = _run([RAY, "job", "submit", f"--address={cluster.dashboard}", "--working-dir=.",
                    f"--runtime-env={RUNTIME_ENV}", "--", "qsnet", "pretrain", *_stage_args(tmp_path, stores)],
                   cluster.env, timeout=600, cwd=work)
        if "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    card = registry.read_card(tmp_path / "models" / "pretrain" / "qsnet" / "t2w")
    assert card["stage"] == "pretrain" and card["epochs"] == 2
    # the head has no CPUs: the training worker ran on the worker node
    from ray.util.state import list_actors

    head = next(n.node_id for n in cluster.alive_nodes() if n.is_head_node)
    workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    assert workers and all(w.node_id != head for w in workers), workers


@pytest.mark.slow
def test_worker_node_lost_mid_training_resumes_from_checkpoint(cluster, tmp_path):
    """The worker node's raylet is killed once a checkpoint exists; a replacement node joins (as
    an autoscaler or KubeRay would start one); FailureConfig restarts the workers there, and the
    run goes on from its latest checkpoint, not from epoch 0."""
    stores = site_stores(tmp_path)
    epochs = 15
    work = _work(tmp_path, epochs=epochs, use_gpu="false", max_failures=3)
    sub = _run([QSNET, "submit", f"--address={cluster.dashboard}", f"--working-dir={work}",
                f"--runtime-env={RUNTIME_ENV}", "--no-wait", "--", "qsnet", "pretrain", *_stage_args(tmp_path, stores)],
               cluster.env, timeout=300)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = sub.stdout.split("submit: job ", 1)[1].split()[0]
    runs = tmp_path / "runs"
    victim = cluster.workers[-1]
    deadline = time.monotonic() + 420
    while _epochs_in_checkpoints(runs) < 3:  # a checkpoint after epoch 3 or later: clearly mid-training
        assert time.monotonic() < deadline, "no checkpoint after epoch 3 in time"
        time.sleep(1)
    os.kill(cluster.raylet_pid(victim), signal.SIGKILL)
    cluster.add_worker()
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + 600
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the job did not finish after the node failure"
        time.sleep(3)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
    hist = json.loads(next(runs.glob("pretrain-*/history.json")).read_text())["pretrain/qsnet/t2w"]
    # every epoch once, in order: nothing was trained twice from epoch 0
    assert [h["epoch"] for h in hist] == list(range(1, epochs + 1))
    # resumed once, from a checkpoint taken before the kill (the controller may not yet have
    # registered the newest one on disk when the node died, so not necessarily epoch 3)
    marks = [h["resumed_from_epoch"] for h in hist]
    resumed = set(marks) - {None}
    assert len(resumed) == 1, marks
    k = resumed.pop()
    assert 1 <= k < epochs and marks[:k] == [None] * k and set(marks[k:]) == {k}, marks
    card = registry.read_card(tmp_path / "models" / "pretrain" / "qsnet" / "t2w")
    assert card["epochs"] == epochs


def _epochs_in_checkpoints(runs: Path) -> int:
    """The most epochs a checkpoint of the run holds (its trainer state's history)."""
    import torch

    best = 0
    for f in runs.glob("pretrain-*/checkpoint_*/stage.pt"):
        try:
            state = torch.load(f, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - one being written right now
            continue
        best = max(best, len(state.get("history") or []))
    return best


@pytest.mark.slow
def test_submit_refuses_gpu_params_on_a_cluster_without_gpus(cluster, tmp_path):
    work = _work(tmp_path, epochs=1, use_gpu="true")
    from ray.job_submission import JobSubmissionClient

    before = len(JobSubmissionClient(cluster.dashboard).list_jobs())
    res = _run([QSNET, "submit", f"--address={cluster.dashboard}", f"--working-dir={work}", "--", "qsnet",
                "pretrain", "--stores", str(tmp_path)], cluster.env, timeout=120)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "asks for 1 GPU worker(s)" in err[0] and "has 0 GPU(s)" in err[0], res.stderr
    assert len(JobSubmissionClient(cluster.dashboard).list_jobs()) == before  # nothing was submitted


def _submit_fails(tmp_path, args, env=None, timeout=60) -> str:
    t0 = time.monotonic()
    res = _run([QSNET, "submit", *args], env or _env(), timeout=timeout)
    assert res.returncode == 1, res.stdout + res.stderr
    assert time.monotonic() - t0 < timeout / 2  # an answer, not a hang
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qsnet submit: error: "), res.stderr
    return err[0]


def test_submit_bad_input_fails_before_anything_is_sent(tmp_path):
    work = _work(tmp_path, epochs=1)
    dead = f"http://127.0.0.1:{_free_port()}"
    msg = _submit_fails(tmp_path, ["--address", dead, f"--working-dir={tmp_path / 'gone'}", "--", "qsnet", "pretrain"])
    assert f"{tmp_path / 'gone'}: working directory does not exist" in msg
    stores = ["--stores", str(tmp_path)]   # absolute: a folder every node of a local cluster sees
    msg = _submit_fails(tmp_path, ["--address", dead, f"--working-dir={work}", "--", "qsnet", "pretrain", *stores])
    assert "cannot reach a Ray dashboard" in msg and dead in msg
    # an address nothing answers at all (a blackholed host) still fails within the probe timeout
    msg = _submit_fails(tmp_path, ["--address", "http://10.255.255.1:8265", f"--working-dir={work}", "--", "qsnet",
                                   "pretrain", *stores])
    assert "cannot reach a Ray dashboard" in msg
    msg = _submit_fails(tmp_path, [f"--working-dir={work}", "--", "qsnet", "pretrain", *stores])
    assert "no cluster address" in msg
    # the default stores/prepared is a folder the working dir never carries: the job would fail there
    msg = _submit_fails(tmp_path, ["--address", dead, f"--working-dir={work}", "--", "qsnet", "pretrain"])
    assert "--stores stores/prepared (the default): a local folder the job cannot read" in msg
    msg = _submit_fails(tmp_path, ["--address", dead, f"--working-dir={work}", "--", "rm", "-rf", "/"])
    assert "submit one of" in msg
    bad_env = tmp_path / "env.yaml"
    bad_env.write_text("pip: 3\n")
    msg = _submit_fails(tmp_path, ["--address", dead, f"--working-dir={work}", f"--runtime-env={bad_env}", "--",
                                   "qsnet", "pretrain"])
    assert str(bad_env) in msg and "runtime_env" in msg
    # storage the caller has no credentials for: named before the cluster is even contacted
    env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path / "home"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    msg = _submit_fails(tmp_path, ["--address", dead, f"--working-dir={work}", "--", "qsnet", "pretrain", "--stores",
                                   "s3://qsnet/stores/prepared"], env=env)
    assert "--stores s3://qsnet/stores/prepared: no storage credentials" in msg
