#!/usr/bin/env bash
# The main job on the embedded default: set up, simulate the two phantom sites (demo size)
# into data/, check they match the committed data.dvc, and run the DVC pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
qsnet simulate --out data --size demo
# Hash the fresh simulation into the DVC cache; the committed data.dvc must not change
# (the simulator is deterministic), after which `dvc status data.dvc` is clean.
dvc add -q data
git diff --exit-code --stat data.dvc
dvc status data.dvc
dvc repro
