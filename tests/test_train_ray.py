"""The pretrain/finetune stages on Ray Train (embedded, CPU, gloo) over small prepared stores:
fault injection and resume, the frozen encoder, model cards, dvclive metrics."""

from __future__ import annotations

import json
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
    assert (reports / "pretrain" / "qsnet" / "t1w" / "metrics.json").exists()
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

