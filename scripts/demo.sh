#!/usr/bin/env bash
# The demo: on a machine with no GPU and no hub access, fine-tune the project's small base model with
# QLoRA (Fine-tuning/01_Train.py) on generated arithmetic word problems, then evaluate the base and
# the fine-tuned model on the same held-out problems and print the comparison table.
# Writes under outputs/demo/ (removed first). Options go to tools/finetune_demo.py: the side-by-side
# comparison of docs/measurements.md is --methods qlora,lora,full --seeds 3 --eval-rows 1000.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
echo "demo     | [1/4] setting up the environment (scripts/setup.sh)"
bash scripts/setup.sh
PY=.venv/bin/python
# One torch thread: on a 2-core machine shared with other jobs, two threads per process made the
# fine-tuning steps ~10x slower (measured); on an idle machine one thread costs little at this size.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "demo     | [2/4] base model: models/Qwen3-arith-1M (built once, then reused)"
$PY tools/make_base_model.py
# 2500 rows: 1500 train, up to 1000 held out (a file's first rows are the same whatever --rows says)
echo "demo     | [3/4] data: 2500 generated openmath-schema problems"
rm -rf outputs/demo
$PY tools/make_samples.py --out-dir outputs/demo/data --rows 2500 --seed 1
echo "demo     | [4/4] fine-tune and evaluate"
$PY tools/finetune_demo.py --data outputs/demo/data/openmath_sample.jsonl --out-root outputs/demo "$@"
echo "demo     | total wall time $(( $(date +%s) - started ))s"
