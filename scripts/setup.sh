#!/usr/bin/env bash
# Creates .venv (once) and installs the pinned stack. torch first and pinned: an unpinned torch would
# pull a multi-GB CUDA build on machines where the CPU wheel is what is wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==$(sed -n 's/^torch==//p' requirements.txt)"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .  # the project's own package (qlora/) and quantization_utils
.venv/bin/python -m pip check
