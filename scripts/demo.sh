#!/usr/bin/env bash
# The main job on the embedded default: set up, simulate the two phantom sites (demo size)
# into data/, check they match the committed data.dvc, and run the DVC pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
qsnet simulate --out data --size demo
dvc status data.dvc
dvc repro
