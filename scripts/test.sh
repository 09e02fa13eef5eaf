#!/usr/bin/env bash
# Sets up the environment if needed, then runs the CPU test suite (slow and GPU tests are opt-in markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
