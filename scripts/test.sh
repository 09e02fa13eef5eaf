#!/usr/bin/env bash
# Sets up the environment if needed, then runs the CPU test suite. With no arguments it also sets up the
# optional PTQ environment (.venv-ptq) and runs the PTQ tests (marker `ptq`); slow and GPU tests are opt-in
# markers (-m slow, -m gpu). With arguments, they go to pytest for the main suite only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  bash scripts/setup_ptq.sh
  .venv/bin/python -m pytest -q -m ptq
fi
