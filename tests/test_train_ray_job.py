"""The README's cluster route: `ray job submit` of a short pretrain run to a local head.

Its own module: the embedded cluster of test_train_ray.py (a module fixture) is shut down
before this one starts its head, so the two never share the machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train_ray import site_stores  # noqa: E402

from train import registry  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pretrain_under_ray_job_submit(tmp_path):
    """The README's cluster route: a local head started here, the stage submitted as a job."""
    import os
    import shutil
    import subprocess

    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    stores = site_stores(tmp_path)
    work = tmp_path / "job"
    work.mkdir()
    (work / "params.yaml").write_text(
        "profile: t\nseed: 0\nt:\n  train:\n    archs: [qsnet]\n    contrasts: [t2w]\n    width: 4\n"
        "    epochs: 1\n    batch_size: 2\n    num_workers: 1\n    use_gpu: false\n")
    port, dash = _free_port(), _free_port()
    # a loopback-only head that lives for this test: no token (a real cluster keeps Ray's
    # token authentication, see the README)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        import time

        for _ in range(36):  # the head's job agent comes up seconds (minutes on a busy machine) after `ray start`
            job = subprocess.run(
                [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={work}", "--",
                 "qsnet", "pretrain", "--stores", str(stores), "--models", str(tmp_path / "models"),
                 "--reports", str(tmp_path / "reports"), "--storage", str(tmp_path / "runs")],
                capture_output=True, text=True, env=env, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
    card = registry.read_card(tmp_path / "models" / "pretrain" / "qsnet" / "t2w")
    assert card["stage"] == "pretrain" and card["epochs"] == 1
