"""params.yaml: one key picks the profile; every stage reads its section of that profile."""

from __future__ import annotations

from pathlib import Path

import yaml

from ingest import first_line

__all__ = ["load_params", "read_mapping", "ParamsError"]


class ParamsError(ValueError):
    pass


def load_params(path: Path | str = "params.yaml", profile: str | None = None) -> dict:
    """``{"profile", "seed", <the profile's sections>}``; ``profile`` overrides the file's choice."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror if isinstance(exc, OSError) else exc})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    name = profile or doc.get("profile")
    if not name or not isinstance(doc.get(name), dict):
        known = sorted(k for k, v in doc.items() if isinstance(v, dict))
        raise ParamsError(f"{path}: profile {name!r} not found (profiles: {', '.join(known) or 'none'})")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"{path}: seed {seed!r}: expected a whole number >= 0")
    return {"profile": name, "seed": seed, **doc[name]}


def read_mapping(path: Path | str, what: str) -> dict:
    """A YAML file whose top level is a mapping (empty file: ``{}``), or one line naming the file
    and ``what`` it should have been."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: cannot read the {what} ({first_line(exc)})") from None
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: not a {what} (expected a mapping)")
    return doc
