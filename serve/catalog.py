"""The served models: a registry folder's cards (``train.registry``), and which card answers a request.

A card's id is its folder under the registry, ``<stage>/<arch>/<contrast>``. For a contrast,
the service answers with the model finetuned on the exam's site when there is one, and
otherwise with the pretrained one (a new site gets the pretrained model until it has its
own). ``model=<arch>`` picks the architecture, ``model=<stage>/<arch>`` the stage as well.
Only models whose input is the MRF maps can be served: the service receives nothing else.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONTRASTS", "load_catalog", "public_card", "select"]

CONTRASTS = ("t1w", "t2w", "t1flair", "t2flair", "swi")
_PUBLIC = ("id", "architecture", "contrast", "inputs", "stage", "profile", "trained_on", "validation", "best_epoch",
           "epochs", "params_hash", "data_version", "git_commit", "weights_sha256", "parameter_count", "created",
           "tuned", "build", "input")


def load_catalog(models: Path | str, cards: list[str] | None = None) -> tuple[dict[str, dict], list[str]]:
    """``{id: card}`` of every servable card under ``models`` (or only the ids in ``cards``),
    and the reasons the others are not served. Weights are checked when a model is loaded."""
    from ingest import storage
    from ingest.prepare.grid import ORIENTATION
    from ingest.prepare.service import orientation_mismatch
    from train.registry import RegistryError, find_cards, read_card

    if storage.is_url(models):
        # each replica takes its own copy: replicas on other nodes share no filesystem
        storage.check_access(str(models))
        root = storage.mirror(str(models))
        if not any(root.iterdir()):
            raise FileNotFoundError(f"{models}: no model registry there (train with `qsnet pretrain` / `finetune`)")
    else:
        root = Path(models)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no model registry folder (train with `qsnet pretrain` / `finetune`)")
    found, skipped = {}, []
    for path in find_cards(root):
        mid = path.parent.relative_to(root).as_posix()
        if cards is not None and mid not in cards:
            continue
        try:
            card = read_card(path)
        except RegistryError as exc:
            skipped.append(str(exc))
            continue
        if card.get("inputs", "mrf") != "mrf":
            skipped.append(f"{mid}: takes {card.get('inputs')!r} inputs; the service receives MRF maps only")
            continue
        if not isinstance(card.get("input"), dict):
            skipped.append(f"{mid}: the card has no input contract (trained before it was recorded): retrain it")
            continue
        why = orientation_mismatch(card["input"], ORIENTATION)  # serve prepares every exam in that order
        if why:
            skipped.append(f"{mid}: {why}")
            continue
        found[mid] = {**card, "id": mid}
    if cards is not None:
        skipped += [f"{c}: listed but not found under {root}" for c in cards if c not in found]
    return found, skipped


def public_card(card: dict) -> dict:
    """What ``GET /v1/models`` shows: no local paths."""
    return {k: card[k] for k in _PUBLIC if k in card}


def select(catalog: dict[str, dict], contrast: str, site: str | None, model: str | None) -> dict:
    """The card that answers ``contrast`` for an exam of ``site``; LookupError with the reason."""
    stage_want, arch_want = None, "qsnet"
    if model:
        parts = model.strip("/").split("/")
        if len(parts) == 3 and model in catalog:
            if catalog[model]["contrast"] != contrast:
                raise LookupError(f"model {model!r} synthesises {catalog[model]['contrast']}, not {contrast}")
            return catalog[model]
        if len(parts) == 2:
            stage_want, arch_want = parts
        elif len(parts) == 1:
            arch_want = parts[0]
        else:
            raise LookupError(f"model {model!r}: give an architecture (qsnet), <stage>/<arch> or a card id "
                              "from GET /v1/models")
    cands = [c for c in catalog.values() if c["contrast"] == contrast and c["architecture"] == arch_want
             and (stage_want is None or c.get("stage") == stage_want)]
    if not cands:
        raise LookupError(f"no served model for {contrast} with architecture {arch_want!r}"
                          + (f" and stage {stage_want!r}" if stage_want else ""))

    def rank(c):
        trained = (c.get("trained_on") or {}).get("site")
        if site and trained == site and c.get("stage") in ("finetune", "scratch", "pretrain"):
            return (0, c.get("stage") != "finetune", c["id"])
        return (1, c.get("stage") != "pretrain", c["id"])

    return sorted(cands, key=rank)[0]
