"""A loopback S3-compatible server for tests (moto), and the environment that points clients at it.

Not a test module. Use it from a test module with

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from s3server import s3  # noqa: E402,F401  (the fixture)

and take `s3` as a fixture argument: an `S3Server` with `endpoint` ("http://127.0.0.1:PORT"),
`bucket` (an empty bucket made for this test), `env` (the AWS_* variables a client needs, fake
credentials only) and helpers `fs()`, `keys()`, `subprocess_env()`.

The server is moto's `ThreadedMotoServer` on a free port, in a daemon thread of the test process:
it stops with the fixture and never leaves a process behind. moto keeps its state in
process-wide backends, so each fixture makes a uniquely named bucket and resets moto on teardown.
moto accepts any credentials; a client without any fails on its own side (botocore's
NoCredentialsError) before it sends a request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Fake, test-only values: moto accepts anything, and nothing here may look like a real key.
FAKE_ACCESS_KEY_ID = "qsnet-test-access-key"
FAKE_SECRET_ACCESS_KEY = "qsnet-test-secret-key-not-real"
REGION = "us-east-1"


def without_aws(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default os.environ) with every AWS_* variable removed."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items() if not k.upper().startswith("AWS_")}


def _no_proxy(base: Mapping[str, str]) -> str:
    parts = [p for p in (base.get("NO_PROXY") or base.get("no_proxy") or "").split(",") if p]
    return ",".join(dict.fromkeys([*parts, "127.0.0.1", "localhost"]))


@contextlib.contextmanager
def patched_environ(env: Mapping[str, str | None], *, clear_aws: bool = True) -> Iterator[None]:
    """Set `env` in os.environ for the duration (a None value unsets), then restore exactly.

    With clear_aws, every other AWS_* variable is unset meanwhile, so in-process clients
    (s3fs, zarr with s3:// URLs) see the test server and nothing of the host's AWS setup.
    fsspec caches S3FileSystem instances by their arguments, not the environment, so the cache
    is cleared on entry and exit: a filesystem made for another server is never reused."""
    saved = dict(os.environ)
    _clear_s3fs_cache()
    try:
        if clear_aws:
            for k in [k for k in os.environ if k.upper().startswith("AWS_")]:
                del os.environ[k]
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        _clear_s3fs_cache()


def _clear_s3fs_cache() -> None:
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str] = field(repr=False)
    _server: object = field(default=None, repr=False)
    _log_level: int = field(default=0, repr=False)

    def fs(self, **kw):
        """A fresh s3fs filesystem on this server (fsspec's instance cache skipped)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"], secret=self.env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.endpoint, client_kwargs={"region_name": REGION},
                                 skip_instance_cache=True, use_listings_cache=False, **kw)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix` (sorted, without the bucket name)."""
        root = f"{self.bucket}/{prefix}".rstrip("/")
        fs = self.fs()
        if not fs.exists(root):
            return []
        return sorted(p[len(self.bucket) + 1:] for p in fs.find(root))

    def subprocess_env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """`base` (default os.environ) without the host's AWS_* variables, plus `env` and `extra`."""
        return {**without_aws(base), **self.env, **extra}

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        with contextlib.suppress(Exception):  # forget this server's buckets in the shared backends
            urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"),
                                   timeout=10).close()
        srv.stop()
        with contextlib.suppress(Exception):
            srv._server.server_close()  # werkzeug's shutdown() leaves the listening socket open
        logging.getLogger("werkzeug").setLevel(self._log_level)


def start_s3_server(scratch: Path, bucket: str | None = None) -> S3Server:
    """Start moto on 127.0.0.1 at a free port and create `bucket` (default: a unique name).

    `scratch` is an empty directory: the shared credentials/config files named in `env` point
    into it and do not exist, so neither ~/.aws nor the host's AWS setup is ever read."""
    from moto.server import ThreadedMotoServer

    werkzeug_log = logging.getLogger("werkzeug")
    quiet = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # no access-log line per request (restored by stop())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",  # no 1-s probes of 169.254.169.254 when keys are missing
        "NO_PROXY": _no_proxy(os.environ),
        "no_proxy": _no_proxy(os.environ),
    }
    s3 = S3Server(endpoint=endpoint, bucket=bucket or f"qsnet-test-{uuid.uuid4().hex[:12]}", env=env,
                  _server=server, _log_level=quiet)
    try:
        import boto3  # s3fs.mkdir sends LocationConstraint=us-east-1, which moto (like AWS) rejects

        boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=FAKE_ACCESS_KEY_ID,
                     aws_secret_access_key=FAKE_SECRET_ACCESS_KEY).create_bucket(Bucket=s3.bucket)
    except BaseException:
        s3.stop()
        raise
    return s3


@pytest.fixture
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server with one empty bucket, stopped (and moto reset) after the test."""
    server = start_s3_server(tmp_path_factory.mktemp("s3scratch"))
    try:
        yield server
    finally:
        server.stop()
