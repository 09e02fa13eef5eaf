#!/usr/bin/env bash
# Sets up both environments if needed, then runs the PTQ tests (marker `ptq`): tools/quantize.py's llmcompressor
# methods, run with .venv-ptq's Python and reloaded in fresh processes of it. Takes a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_ptq.sh
exec .venv/bin/python -m pytest -q -m ptq "$@"
