"""A DVC remote on S3-compatible object storage (moto on loopback): push, fresh clone, pull.

The same round trip as test_ingest_dvc.py, on an `s3://` remote instead of a local folder, with a
small generated tree so it stays quick. Credentials come from the environment only (fake test
values, see s3server.py); HOME is an empty folder, so no ~/.aws is ever read."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for s3server, test_ingest_dvc

from s3server import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, S3Server, s3  # noqa: E402,F401
from test_ingest_dvc import digest  # noqa: E402

DVC = str(Path(sys.executable).parent / "dvc")
PREFIX = "dvcstore"


def run(*cmd, cwd, env, ok=True) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}"
    return res


def make_tree(root: Path) -> None:
    """A tiny phantom-shaped tree: nested exams, binary and text files, one empty, one ~1 MiB."""
    rng = np.random.default_rng(0)
    for site, exam in (("site-A", "sub-A01"), ("site-B", "sub-B01")):
        d = root / site / exam / "series-1"
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"IM{i:04d}.dcm").write_bytes(rng.integers(0, 256, 4096 + 17 * i, dtype=np.uint8).tobytes())
        (d.parent / "notes.txt").write_text(f"{site} {exam}\n")
    (root / "site-A" / "big.bin").write_bytes(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    (root / "site-B" / "empty.dat").write_bytes(b"")


def md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def repo_with_s3_remote(server: S3Server, work: Path, env: dict[str, str]) -> None:
    """A git+DVC repo at `work` with data/ tracked and committed, default remote on `server`."""
    make_tree(work / "data")
    run("git", "init", "-q", cwd=work, env=env)
    run("git", "config", "user.email", "ci@example.invalid", cwd=work, env=env)
    run("git", "config", "user.name", "ci", cwd=work, env=env)
    run(DVC, "init", "-q", cwd=work, env=env)
    run(DVC, "config", "core.analytics", "false", cwd=work, env=env)
    run(DVC, "remote", "add", "-d", "s3remote", f"s3://{server.bucket}/{PREFIX}", cwd=work, env=env)
    run(DVC, "remote", "modify", "s3remote", "endpointurl", server.endpoint, cwd=work, env=env)
    run(DVC, "add", "data", cwd=work, env=env)
    run("git", "add", "-A", cwd=work, env=env)
    run("git", "commit", "-qm", "data", cwd=work, env=env)


@pytest.fixture
def home(tmp_path) -> Path:
    """An empty HOME: no ~/.aws, no global git or DVC config."""
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.mark.slow
def test_push_pull_s3_remote_fresh_clone(s3, tmp_path, home):  # noqa: F811 (the fixture)
    work, clone = tmp_path / "work", tmp_path / "clone"
    work.mkdir()
    env = s3.subprocess_env(HOME=str(home))
    del env["AWS_ENDPOINT_URL"]  # DVC must find the server through the remote's endpointurl alone
    repo_with_s3_remote(s3, work, env)

    # the remote's config names the bucket and endpoint, never a credential
    config = (work / ".dvc" / "config").read_text()
    assert f"url = s3://{s3.bucket}/{PREFIX}" in config and f"endpointurl = {s3.endpoint}" in config
    for secret in (FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, "access_key_id", "secret_access_key"):
        assert secret not in config
    assert not (work / ".dvc" / "config.local").exists()

    assert s3.keys(PREFIX) == []
    run(DVC, "push", cwd=work, env=env)

    # every file (and the directory listing) landed in the bucket, content-addressed by md5
    keys = set(s3.keys(PREFIX))
    files = [p for p in (work / "data").rglob("*") if p.is_file()]
    want = {f"{PREFIX}/files/md5/{h[:2]}/{h[2:]}" for h in map(md5, files)}
    assert want <= keys, sorted(want - keys)
    dir_keys = keys - want
    assert len(dir_keys) == 1 and next(iter(dir_keys)).endswith(".dir"), sorted(keys)
    fs = s3.fs()
    big = work / "data" / "site-A" / "big.bin"
    h = md5(big)
    assert fs.cat(f"{s3.bucket}/{PREFIX}/files/md5/{h[:2]}/{h[2:]}") == big.read_bytes()

    run("git", "clone", "-q", work, clone, cwd=tmp_path, env=env)
    assert not (clone / "data").exists()
    run(DVC, "pull", cwd=clone, env=env)
    assert digest(clone / "data") == digest(work / "data")
    assert len(digest(clone / "data")) == len(files) == 10
    status = run(DVC, "status", "--cloud", cwd=clone, env=env).stdout.lower()
    assert "in sync" in status, status


@pytest.mark.slow
def test_push_without_credentials_fails_and_writes_nothing(s3, tmp_path, home):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    repo_with_s3_remote(s3, work, s3.subprocess_env(HOME=str(home)))

    env = s3.subprocess_env(HOME=str(home))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    # the shared credentials/config files named in env do not exist, and HOME has no ~/.aws
    assert not Path(env["AWS_SHARED_CREDENTIALS_FILE"]).exists() and not Path(env["AWS_CONFIG_FILE"]).exists()
    assert not (home / ".aws").exists()

    res = run(DVC, "push", cwd=work, env=env, ok=False)
    out = (res.stdout + res.stderr).lower()
    assert res.returncode != 0, out
    assert "unable to locate credentials" in out or "access denied" in out, out
    assert s3.keys(PREFIX) == []
    assert s3.keys() == []  # nothing anywhere in the bucket
