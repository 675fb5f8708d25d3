"""The model registry: ``models/<stage>/<arch>/<contrast>/`` = ``model.pt`` + ``card.json``.

The card says what the weights are (architecture and its build config, contrast, input kind,
stage, profile), where they came from (params hash, data version from ``data.dvc``, git
commit) and how good they were (validation metrics), with the weights' sha256 so that a
swapped or damaged file is refused. Serve and evaluate load models only through :func:`load`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["save", "load", "read_card", "find_cards", "RegistryError"]

CARD_VERSION = 1


class RegistryError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_version(repo: Path = Path(".")) -> str | None:
    """The md5 of ``data/`` as ``data.dvc`` records it."""
    import yaml

    try:
        doc = yaml.safe_load((repo / "data.dvc").read_text())
        return str(doc["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return None


def git_commit(repo: Path = Path(".")) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def save(folder: Path, generator: nn.Module, card: dict) -> Path:
    """Write weights and card atomically (card last: a folder with a card is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pt"
    tmp = folder / f".model.pt.tmp-{os.getpid()}"
    torch.save(generator.state_dict(), tmp)
    os.replace(tmp, weights)
    full = {"card_version": CARD_VERSION, **card, "weights": weights.name, "weights_sha256": _sha256(weights),
            "parameter_count": sum(p.numel() for p in generator.parameters()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = folder / "card.json"
    tmp = folder / f".card.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_card(card: Path | str) -> dict:
    card = Path(card)
    if card.is_dir():
        card = card / "card.json"
    try:
        doc = json.loads(card.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{card}: model card not found") from None
    except ValueError as exc:
        raise RegistryError(f"{card}: not a JSON model card ({exc})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{card}: not a model card (a JSON {type(doc).__name__}, not an object)")
    for key in ("architecture", "build", "contrast", "inputs", "weights", "weights_sha256"):
        if key not in doc:
            raise RegistryError(f"{card}: model card lacks {key!r}")
    doc["_path"] = str(card)
    return doc


def card_build(doc: dict) -> dict:
    """A card's build config as :func:`train.models.build` takes it, checked."""
    from train.models import build_config

    # a card written before the U-Net's norms learnt a scale and shift has no such key: its
    # weights have none
    return build_config(**{"norm_affine": False, **doc["build"]})


def load(card: Path | str | dict, device: str | torch.device = "cpu") -> nn.Module:
    """The generator described by ``card`` (a path to card.json or its folder), weights checked, in eval mode."""
    from train.models import build

    doc = card if isinstance(card, dict) else read_card(card)
    folder = Path(doc["_path"]).parent
    weights = folder / doc["weights"]
    if not weights.exists():
        raise RegistryError(f"{weights}: weights file named by the card is missing")
    if _sha256(weights) != doc["weights_sha256"]:
        raise RegistryError(f"{weights}: sha256 differs from the card's: the file was changed or damaged")
    cfg = doc["build"]
    try:
        model = build(**card_build(doc))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{doc['_path']}: bad build config ({exc})") from None
    if cfg.get("arch") != doc["architecture"]:
        # weights of one architecture can fit another's build only by accident; the card's word is what serve shows
        raise RegistryError(f"{doc['_path']}: the card says {doc['architecture']!r}, its build config "
                            f"{cfg.get('arch')!r}")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
        model.generator.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - corrupt pickles raise many kinds
        # the whole message: torch's first line only says that loading failed, the next ones why
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise RegistryError(f"{weights}: cannot load the weights ({why[:400]})") from None
    return model.generator.to(device).eval()


def find_cards(root: Path | str = "models") -> list[Path]:
    return sorted(Path(root).glob("*/*/*/card.json"))
