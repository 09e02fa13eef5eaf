#!/usr/bin/env bash
# The README's first command: set up, build a tiny Qwen3-architecture model locally (no hub access
# needed), and fine-tune it with QLoRA on the shipped openmath-schema sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
MODEL_DIR=.cache/models/Qwen3-tiny
[ -f "$MODEL_DIR/model.safetensors" ] || $PY tools/make_tiny_model.py "$MODEL_DIR"
$PY Fine-tuning/01_Train.py --MODEL_NAME="$MODEL_DIR" --DATASET_PATH=samples/openmath_sample.jsonl \
  --OUTPUT_ROOT=outputs/demo --if_output_exists=suffix --max_steps=30 --per_device_train_batch_size=4 \
  --gradient_accumulation_steps=1 --learning_rate=2e-3 --max_seq_length=256 --logging_steps=5 "$@"
