"""The pretrain/finetune stages on Ray Train (embedded, CPU, gloo) over small prepared stores:
fault injection and resume, the frozen encoder, model cards, dvclive metrics."""

from __future__ import annotations

import json
import os
import time
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train_data import fake_prepared  # noqa: E402

from ingest.params import ParamsError  # noqa: E402
from train import registry  # noqa: E402
from train.stages import run_stage  # noqa: E402


def site_stores(root: Path):
    """site-A train/val and site-B finetune/val stores, 64 x 64."""
    for site, splits in (("site-A", ("train", "val")), ("site-B", ("finetune", "val"))):
        for split in splits:
            paths = fake_prepared(root / "tmp" / site / split, n=1 if split == "val" else 2, z=5, size=64,
                                  split=split, prefix=f"{site[-1].lower()}{split}")
            for p in paths:
                dst = root / "prepared" / site / p.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                p.rename(dst)
                meta = json.loads((dst / "zarr.json").read_text())
                meta["attributes"]["site"] = site
                (dst / "zarr.json").write_text(json.dumps(meta))
    return root / "prepared"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"QSNET_FAIL_AT_EPOCH": "1"}})
    yield
    ray.shutdown()


PARAMS = {"profile": "test", "seed": 0,
          "train": {"archs": ["qsnet"], "contrasts": ["t1w"], "width": 4, "epochs": 3, "batch_size": 2,
                    "plateau_after_epoch": 1, "checkpoint_every": 1, "max_failures": 1, "num_workers": 1,
                    "use_gpu": False, "ema_decay": 0.9}}  # the average: resumed, and the encoder kept in it


@pytest.mark.slow
def test_pretrain_survives_a_failure_and_finetune_freezes_the_encoder(ray_cluster, tmp_path):
    stores = site_stores(tmp_path)
    models, reports, runs = tmp_path / "models", tmp_path / "reports", tmp_path / "runs"
    cards = run_stage("pretrain", PARAMS, stores, models, reports, runs)
    # the injected failure happened once, and the run went on from the epoch-1 checkpoint
    run_dir = next(runs.glob("pretrain-*"))
    assert (run_dir / ".failed-once").exists()
    hist = json.loads((run_dir / "history.json").read_text())["pretrain/qsnet/t1w"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["resumed_from_epoch"] for h in hist] == [None, 1, 1]
    card = registry.read_card(cards[0])
    assert card["architecture"] == "qsnet" and card["stage"] == "pretrain" and card["epochs"] == 3
    assert card["trained_on"] == {"site": "site-A", "split": "train", "exams": 2, "val_exams": 1}
    for key in ("params_hash", "git_commit", "weights_sha256", "parameter_count", "created", "validation"):
        assert key in card
    curves = reports / "pretrain" / "qsnet" / "t1w"
    assert len((curves / "plots" / "metrics" / "val_l1.tsv").read_text().splitlines()) == 1 + 3   # header + epochs
    assert not (curves / "metrics.json").exists()   # a plots folder holds curves only (dvc plots show)
    assert json.loads((reports / "pretrain.json").read_text())["pretrain/qsnet/t1w"]["epochs"] == 3

    fcards = run_stage("finetune", PARAMS, stores, models, reports, runs)
    pre, fine = registry.load(cards[0]), registry.load(fcards[0])
    assert all(torch.equal(a, b) for a, b in zip(pre.encoder.state_dict().values(), fine.encoder.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(pre.decoder.state_dict().values(), fine.decoder.state_dict().values()))
    assert registry.read_card(fcards[0])["encoder_frozen"] is True
    assert registry.read_card(fcards[0])["trained_on"]["site"] == "site-B"

    # site B prepared with another input scaling than the pretrained model's: refused before training
    card_path = Path(cards[0])
    card = json.loads(card_path.read_text())
    card["input"] = {"normalise": {"inputs": "rate", "rate_ms": {"mrf_t1": 250, "mrf_t2": 20}}}
    card_path.write_text(json.dumps(card))
    for meta_path in (stores / "site-B").glob("*/zarr.json"):
        meta = json.loads(meta_path.read_text())
        meta["attributes"]["input_contract"] = {"normalise": {"percentiles": [0.5, 99.5]}}
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ParamsError, match="the model takes MRF inputs scaled as rates .* the stores hold them "
                                          "scaled between per-exam percentiles"):
        run_stage("finetune", PARAMS, stores, models, reports, runs)

    # a model pretrained before QS-Net's norms learnt a scale and shift (its card has no norm_affine):
    # it loads as it was built, and finetune refuses it in one line rather than in the workers
    from train.models import build

    doc = registry.read_card(card_path)
    old_build = {k: v for k, v in doc["build"].items() if k != "norm_affine"}
    old = build(**old_build, norm_affine=False)
    registry.save(card_path.parent, old.generator, {**{k: v for k, v in doc.items() if not k.startswith("_")},
                                                    "build": old_build})
    assert not [n for n, _ in registry.load(card_path).named_parameters() if ".norm1." in n]
    with pytest.raises(ParamsError, match=r"pretrain/qsnet/t1w/card.json: pretrained with norm_affine False "
                                          r"\(params: True\): run pretrain again"):
        run_stage("finetune", PARAMS, stores, models, reports, runs)


def test_missing_stores_and_small_images_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="qsnet prepare"):
        run_stage("pretrain", PARAMS, tmp_path / "none", tmp_path / "m", tmp_path / "r", tmp_path / "runs")
    small = tmp_path / "small"
    for split in ("train", "val"):
        for p in fake_prepared(small / split, n=1, size=32, split=split, prefix=split):
            dst = small / "p" / "site-A" / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            p.rename(dst)
    with pytest.raises(ValueError, match="at least 64 x 64"):
        run_stage("pretrain", PARAMS, small / "p", tmp_path / "m", tmp_path / "r", tmp_path / "runs")



def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    """The worker loop without Ray (its ray.train calls stood in for): a failure at epoch 2 and a
    resume from the last checkpoint give the same history and weights as no failure. Each
    epoch's shuffle must follow (seed, epoch): a resumed process replaying epoch 0's order
    trained on another sequence of batches and ended with other weights."""
    import contextlib
    import tempfile

    import ray.train
    import ray.train.torch

    from train import distributed

    class Ckpt:
        def __init__(self, blob):
            self.blob = blob

        @classmethod
        def from_directory(cls, d):
            return cls((Path(d) / distributed.CKPT).read_bytes())

        @contextlib.contextmanager
        def as_directory(self):
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / distributed.CKPT).write_bytes(self.blob)
                yield d

    class Ctx:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    reported: list = []
    resume: list = [None]
    monkeypatch.setattr(ray.train, "get_context", lambda: Ctx())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: resume[0])
    monkeypatch.setattr(ray.train, "Checkpoint", Ckpt)
    monkeypatch.setattr(ray.train, "report", lambda m, checkpoint=None: reported.append((m, checkpoint)))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    train_stores = fake_prepared(tmp_path / "a", n=2, z=6, size=32, split="train", prefix="tr")
    val_stores = fake_prepared(tmp_path / "b", n=1, z=6, size=32, split="val", prefix="va")
    name = "pretrain/qsnet/t1w"

    def config(root):
        return {"width": 4, "depth": 4, "epochs": 4, "batch_size": 2, "lr": 1e-3, "betas": [0.5, 0.999],
                "plateau_factor": 0.5, "plateau_after_epoch": 0, "ds_weights": [0.5, 0.25], "adv_weight": 0.01,
                "augment": True, "checkpoint_every": 1, "amp": False, "seed": 0, "ema_decay": 0.9,
                "name": "run", "storage": str(root), "torch_threads": 1,
                "runs": [{"name": name, "arch": "qsnet", "contrast": "t1w", "inputs": "mrf",
                          "train_stores": [str(p) for p in train_stores], "val_stores": [str(p) for p in val_stores]}]}

    def outcome(root):
        vals = [m["val_l1"] for m, _ in reported]
        return vals, torch.load(root / "run" / "best" / (name.replace("/", "__") + ".pt"), weights_only=True)

    monkeypatch.delenv("QSNET_FAIL_AT_EPOCH", raising=False)
    distributed.train_loop_per_worker(config(tmp_path / "whole"))
    vals_a, best_a = outcome(tmp_path / "whole")
    reported.clear()
    monkeypatch.setenv("QSNET_FAIL_AT_EPOCH", "2")
    with pytest.raises(RuntimeError, match="injected failure at epoch 2"):
        distributed.train_loop_per_worker(config(tmp_path / "broken"))
    resume[0] = [c for _, c in reported if c is not None][-1]
    distributed.train_loop_per_worker(config(tmp_path / "broken"))
    vals_b, best_b = outcome(tmp_path / "broken")
    assert [m["resumed_from_epoch"] for m, _ in reported[-2:]] == [2, 2]
    assert [m["trial_epoch"] for m, _ in reported[-2:]] == [3, 4]   # the run's epochs, not this session's
    assert vals_b == vals_a
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)


@pytest.mark.slow
def test_ctrl_c_stops_a_stage_of_parallel_runs(tmp_path):
    """Two runs side by side train in their own threads: Ctrl-C must end the command (exit 130),
    not leave it training until both runs are done."""
    import signal
    import subprocess

    import yaml

    stores = site_stores(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"profile": "t", "seed": 0, "t": {"train": {
        "archs": ["qsnet", "resunet"], "contrasts": ["t1w", "t2w"], "width": 4, "epochs": 200, "batch_size": 2,
        "checkpoint_every": 1, "num_workers": 1, "parallel_runs": 2, "use_gpu": False, "augment": False}}}))
    exe = Path(sys.executable).parent / "qsnet"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ingest"]
    runs = tmp_path / "runs"
    proc = subprocess.Popen(cmd + ["pretrain", "--params", str(params), "--stores", str(stores), "--models",
                                   str(tmp_path / "models"), "--reports", str(tmp_path / "rep"), "--storage", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True)
    try:
        deadline = time.time() + 300
        # both runs have written a checkpoint: they are training
        while len(list(runs.glob("pretrain-*/checkpoint_*"))) < 2:
            if proc.poll() is not None or time.time() > deadline:
                if proc.poll() is None:   # killed first: reading a live job's output would wait for its end
                    os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(proc.communicate(timeout=60)[0][-3000:])
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)   # as a terminal's Ctrl-C: the whole foreground group
        # the timeout bounds the stop; a loaded machine's ray.shutdown() takes its time within it
        log = proc.communicate(timeout=90)[0]
        assert proc.returncode == 130 and "interrupted" in log, log[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
