#!/usr/bin/env bash
# Creates .venv-ptq (once) with the PTQ stack of requirements-ptq.txt: llmcompressor for tools/quantize.py's
# GPTQ and W8A8 methods. It pins an older transformers than the training stack, hence its own venv.
# torch first and pinned, as in setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-ptq/bin/python ]; then
  python3 -m venv .venv-ptq
fi
.venv-ptq/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv-ptq/bin/python -m pip install -q "torch==$(sed -n 's/^torch==//p' requirements-ptq.txt)"
.venv-ptq/bin/python -m pip install -q -r requirements-ptq.txt
.venv-ptq/bin/python -m pip install -q --no-deps -e .  # the project's own package (qlora/) and quantization_utils
.venv-ptq/bin/python -m pip check
