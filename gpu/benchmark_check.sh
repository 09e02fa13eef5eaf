#!/usr/bin/env bash
# Memory and speed on one CUDA GPU (H200): tools/benchmark.py for the Qwen3-0.6B architecture (random weights),
# seq 2048, LoRA r=64 and r=256, with the TRL-docs QLoRA recipe as the baseline in each run.
# Peaks are torch.cuda max allocated/reserved per worker process. About 4 minutes on an H200.
# Usage: bash gpu/benchmark_check.sh   (results: $OUT, default ./gpu_out: JSON + the printed tables)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
run() {  # rank, seconds, cases
  timeout "$2" python3 tools/benchmark.py --arch Qwen3-0.6B --seq 2048 --batch 1 --rank "$1" --steps 3 --warmup 1 \
    --cases "$3" --work-dir "$WORK" --out "$OUT/benchmark_r$1.json" 2>&1 | grep -v Warning | tee "$OUT/benchmark_r$1.txt" \
    || echo "r=$1 run failed or timed out"
  cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
}
run 64 150 trl_docs_qlora,qlora,lora_bf16   # includes building the random model once
run 256 90 trl_docs_qlora,qlora
echo "done: $OUT"
