#!/usr/bin/env bash
# Throughput side by side on one CUDA GPU (H200): the TRL-docs QLoRA recipe, the project's default, each speed
# lever (batch 4 x accumulation 1 vs 1 x 4, padding-free and packed mixed-length rows, Liger kernels, activation
# offloading) and unsloth, each case in its own process (tools/benchmark.py --cases throughput). Qwen3-0.6B
# architecture with random weights, seq 2048, LoRA r=256 (the default), 3 measured optimizer steps after 1 warm-up.
# Planned to end within 8 minutes on an H200; every case is cut at --case-timeout, the whole run at 450 s, and
# what was measured is kept either way.
#   here, once (needs PyPI):  python gpu/fetch_wheels.py      (.whl/: the pinned stack; .whl/unsloth/: unsloth's)
#   on the GPU machine:       bash gpu/throughput_check.sh    (device tool: carry [".whl"]; results in $OUT)
#   on CPU, to test the logic: bash gpu/throughput_check.sh --dry-run   (tiny model, 1 step per case)
# $OUT gets throughput.json (every result), throughput.txt (the printed tables), logs.tgz (one log per case).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
if [ "${1:-}" = "--dry-run" ]; then
  "$PY" tools/make_tiny_model.py "$WORK/tiny" > /dev/null || exit 1
  RUN=(--model "$WORK/tiny" --seq 128 --rank 8 --steps 1 --warmup 0 --case-timeout 300)
  LIMIT=1500
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/env.txt" 2>&1
  if [ -d .whl ]; then  # the project's pinned stack over the image's packages
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site:$PWD"
  fi
  UNSLOTH=()
  if [ -d .whl/unsloth ]; then  # unsloth's own versions (transformers 5.17, trl 1.15, datasets 4.8) in their own directory
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-unsloth .whl/unsloth/*.whl \
      .whl/bitsandbytes-*.whl .whl/peft-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl && UNSLOTH=(--unsloth-site /tmp/site-unsloth)
  fi
  "$PY" -c "import torch, transformers, peft, trl, bitsandbytes, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__,
'datasets', datasets.__version__)" | tee -a "$OUT/env.txt"
  RUN=(--arch Qwen3-0.6B --seq 2048 --rank 256 --steps 3 --warmup 1 --case-timeout 120 ${UNSLOTH[@]+"${UNSLOTH[@]}"})
  LIMIT=450
fi
timeout "$LIMIT" "$PY" tools/benchmark.py --cases throughput --batch 1 --work-dir "$WORK" --out "$OUT/throughput.json" \
  "${RUN[@]}" 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
status=${PIPESTATUS[0]}
if [ "$status" != 0 ] && [ -s "$OUT/throughput.json" ]; then  # cut short: the tables of what was measured
  echo "benchmark exit $status: tables of the cases measured so far" | tee -a "$OUT/throughput.txt"
  "$PY" tools/benchmark.py --from-json "$OUT/throughput.json" 2>&1 | tee -a "$OUT/throughput.txt"
fi
(cd "$WORK" && tar czf - ./*.log) > "$OUT/logs.tgz" 2>/dev/null
rm -rf "$WORK"
echo "done: $OUT (exit $status)"
exit "$status"
