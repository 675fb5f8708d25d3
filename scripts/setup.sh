#!/usr/bin/env bash
# Set up qsnet on a fresh machine: a virtualenv in .venv (unless one is already active),
# torch==2.13.0 first (any other torch requirement pulls a multi-GB CUDA build), then the
# project with its test extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
# grep only filters pip's noise: its own status must still fail the script (pipefail)
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
quiet python -m pip install -q --upgrade pip
quiet python -m pip install -q "torch==2.13.0"
quiet python -m pip install -q -e ".[test]"
# from another folder: in the repository `import ingest` finds the source tree, installed or not
(cd / && python -c "import torch, monai, dvc, ingest.cli; assert torch.__version__.startswith('2.13.0'), torch.__version__")
command -v qsnet >/dev/null || { echo "setup: qsnet is not on PATH after the install" >&2; exit 1; }
# The viewer test drives Debian's chromium through Playwright (no browser download): install the
# package where this runs as root with apt; elsewhere that one test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the viewer's browser test will be skipped" >&2
fi
# DVC needs a git repository; a source tarball without one still gets a working pipeline.
[ -d .git ] || git init -q
