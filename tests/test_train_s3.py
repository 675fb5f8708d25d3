"""Stages on object storage: prepared stores, model registry, reports and Ray Train's run storage
all at s3:// URLs on a loopback S3-compatible server (moto), nothing on a shared filesystem.

pretrain and finetune run as the CLI runs them (a subprocess whose only credentials are the
fake test keys in its environment); serve's catalogue then reads the registry from the bucket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from s3server import patched_environ, s3, without_aws  # noqa: E402,F401
from test_train_ray import site_stores  # noqa: E402

QSNET = str(Path(sys.executable).parent / "qsnet")
PARAMS = ("profile: t\nseed: 0\nt:\n  train:\n    archs: [qsnet]\n    contrasts: [t2w]\n    width: 4\n"
          "    epochs: 2\n    batch_size: 2\n    num_workers: 1\n    use_gpu: false\n    checkpoint_every: 1\n")


def _qsnet(args, cwd, env, ok=True):
    res = subprocess.run([QSNET, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_pretrain_and_finetune_read_and_write_s3(s3, tmp_path):  # noqa: F811
    local = site_stores(tmp_path)
    fs = s3.fs()
    fs.put(str(local), f"{s3.bucket}/prepared", recursive=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS)
    env = s3.subprocess_env(HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    b = f"s3://{s3.bucket}"
    loc = ["--stores", f"{b}/prepared", "--models", f"{b}/models", "--reports", f"{b}/reports/train",
           "--storage", f"{b}/runs"]
    pre = _qsnet(["pretrain", *loc], work, env)
    assert f"{b}/models/pretrain/qsnet/t2w/card.json" in pre.stdout
    fine = _qsnet(["finetune", *loc], work, env)
    assert "finetune: 1 model(s)" in fine.stdout, fine.stdout
    # nothing landed beside the job: every output is in the bucket
    assert not any((work / d).exists() for d in ("models", "reports", "runs"))
    keys = s3.keys()
    for stage in ("pretrain", "finetune"):
        assert f"models/{stage}/qsnet/t2w/card.json" in keys and f"models/{stage}/qsnet/t2w/model.pt" in keys
        assert f"reports/train/{stage}.json" in keys
    # Ray Train's checkpoints and the finished models' best weights are in the run storage
    assert any(k.startswith("runs/pretrain-") and "/checkpoint_" in k for k in keys), keys
    assert any(k.startswith("runs/finetune-") and k.endswith("history.json") for k in keys)
    # the finetune started from the pretrained weights, copied into the run storage for its workers
    card = json.loads(fs.cat_file(f"{s3.bucket}/models/pretrain/qsnet/t2w/card.json"))
    assert f"runs/init/{card['weights_sha256']}.pt" in keys
    fcard = json.loads(fs.cat_file(f"{s3.bucket}/models/finetune/qsnet/t2w/card.json"))
    assert fcard["trained_on"]["site"] == "site-B" and fcard["encoder_frozen"] is True

    # serve's catalogue and the registry loader read the registry from the bucket as from a folder
    from ingest.storage import mirror
    from serve.catalog import load_catalog
    from train import registry

    with patched_environ(s3.env):
        found, skipped = load_catalog(f"{b}/models")
        local_copy = mirror(f"{b}/models")
    # these test stores carry no prepare input contract, so the cards are listed as not servable,
    # by name: the catalogue found both in the bucket
    assert not found and sorted(s.split(":")[0] for s in skipped) == ["finetune/qsnet/t2w", "pretrain/qsnet/t2w"]
    model = registry.load(local_copy / "finetune" / "qsnet" / "t2w")
    assert sum(p.numel() for p in model.parameters()) == fcard["parameter_count"]


def test_missing_credentials_fail_before_training(s3, tmp_path):  # noqa: F811
    """No keys in the environment, no ~/.aws: one line naming the location, before Ray starts."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS)
    env = {**without_aws(), "HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": s3.endpoint,
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("RAY_ADDRESS", None)
    res = _qsnet(["pretrain", "--stores", f"s3://{s3.bucket}/prepared", "--models", str(tmp_path / "m"),
                  "--storage", str(tmp_path / "runs")], work, env, ok=False)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "no storage credentials" in err[0] and f"s3://{s3.bucket}/prepared" in err[0], res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m").exists()
    # a bucket that is not there is named as such
    res = _qsnet(["pretrain", "--stores", "s3://no-such-bucket/prepared", "--storage", str(tmp_path / "runs")],
                 work, s3.subprocess_env(HOME=str(tmp_path / "home")), ok=False)
    assert res.returncode == 1 and "bucket 'no-such-bucket' does not exist" in res.stderr, res.stderr


def test_a_registry_uploaded_again_never_pairs_an_old_card_with_new_weights(s3, tmp_path, monkeypatch):  # noqa: F811
    """Overwriting a model on S3: with new weights up and the old card still there, every reader's
    sha256 check failed, for good if the upload stopped there. The old card goes first."""
    from ingest import storage

    url = f"s3://{s3.bucket}/models"
    local = tmp_path / "reg" / "pretrain" / "qsnet" / "t1w"
    local.mkdir(parents=True)
    (local / "model.pt").write_bytes(b"weights v1")
    (local / "card.json").write_text('{"weights_sha256": "v1"}')
    with patched_environ(s3.env):
        assert storage.upload(tmp_path / "reg", url) == 2
        (local / "model.pt").write_bytes(b"weights v2")
        (local / "card.json").write_text('{"weights_sha256": "v2"}')
        real = storage._fs

        class CutAtTheCard:   # the connection drops as the card goes up
            def __init__(self, fs):
                self.fs = fs

            def __getattr__(self, name):
                return getattr(self.fs, name)

            def put_file(self, src, dst, **kw):
                if dst.endswith("card.json"):
                    raise OSError("connection reset")
                return self.fs.put_file(src, dst, **kw)

        def cut_after_weights(u):
            fs, path = real(u)
            return CutAtTheCard(fs), path
        monkeypatch.setattr(storage, "_fs", cut_after_weights)
        with pytest.raises(OSError):
            storage.upload(tmp_path / "reg", url)
        monkeypatch.setattr(storage, "_fs", real)
        keys = s3.keys()
        assert "models/pretrain/qsnet/t1w/card.json" not in keys   # no card: the model is not there yet
        storage.upload(tmp_path / "reg", url)
        fs = s3.fs()
        assert fs.cat_file(f"{s3.bucket}/models/pretrain/qsnet/t1w/card.json") == b'{"weights_sha256": "v2"}'
        assert fs.cat_file(f"{s3.bucket}/models/pretrain/qsnet/t1w/model.pt") == b"weights v2"


def test_uploading_a_registry_again_leaves_unchanged_models_alone(s3, tmp_path, monkeypatch):  # noqa: F811
    from ingest import storage

    url = f"s3://{s3.bucket}/models"
    for contrast in ("t1w", "t2w"):
        d = tmp_path / "reg" / "pretrain" / "qsnet" / contrast
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(f"weights {contrast}".encode())
        (d / "card.json").write_text(f'{{"c": "{contrast}"}}')
    with patched_environ(s3.env):
        storage.upload(tmp_path / "reg", url)
        (tmp_path / "reg" / "pretrain" / "qsnet" / "t2w" / "model.pt").write_bytes(b"weights t2w v2")
        (tmp_path / "reg" / "pretrain" / "qsnet" / "t2w" / "card.json").write_text('{"c": "t2w v2"}')
        # a file in a model's sub-folder is the model's too: it goes up between the cards
        (tmp_path / "reg" / "pretrain" / "qsnet" / "t2w" / "extra").mkdir()
        (tmp_path / "reg" / "pretrain" / "qsnet" / "t2w" / "extra" / "curve.json").write_text("[]")
        touched = []
        real = storage._fs

        class Spy:
            def __init__(self, fs):
                self.fs = fs

            def __getattr__(self, name):
                return getattr(self.fs, name)

            def put_file(self, src, dst, **kw):
                touched.append(dst.rsplit("/models/", 1)[1])
                return self.fs.put_file(src, dst, **kw)

            def rm_file(self, p):
                touched.append("rm " + p.rsplit("/models/", 1)[1])
                return self.fs.rm_file(p)

        monkeypatch.setattr(storage, "_fs", lambda u: (Spy(real(u)[0]), real(u)[1]))
        storage.upload(tmp_path / "reg", url)
    assert touched == ["rm pretrain/qsnet/t2w/card.json", "pretrain/qsnet/t2w/extra/curve.json",
                       "pretrain/qsnet/t2w/model.pt", "pretrain/qsnet/t2w/card.json"]


def test_submit_checks_the_s3_paths_it_reads_and_writes(s3, tmp_path):  # noqa: F811
    """Before anything is sent: a stores prefix with nothing under it (a typo) and a registry the
    credentials cannot write are refused; paths that are fine go on to the cluster probe."""
    from train.submit import SubmitError, preflight

    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS)
    s3.fs().pipe_file(f"{s3.bucket}/prepared/site-A/x/zarr.json", b"{}")
    b = f"s3://{s3.bucket}"
    dead = "http://127.0.0.1:9"
    with patched_environ(s3.env):
        with pytest.raises(SubmitError, match=f"--stores {b}/prepped: nothing there to read"):
            preflight(dead, work, ["qsnet", "pretrain", "--stores", f"{b}/prepped", "--models", f"{b}/models"])
        with pytest.raises(SubmitError, match="cannot reach a Ray dashboard"):
            preflight(dead, work, ["qsnet", "pretrain", "--stores", f"{b}/prepared", "--models", f"{b}/models",
                                   "--reports", f"{b}/reports", "--storage", f"{b}/runs"])
        # the write check leaves nothing behind
        assert not [k for k in s3.keys() if "write-check" in k]
        with pytest.raises(SubmitError, match="No such option: --storess"):
            preflight(dead, work, ["qsnet", "pretrain", "--storess", f"{b}/prepared"])

