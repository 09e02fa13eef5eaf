#!/usr/bin/env bash
# GPU checks run on a lent H200 through the device tool (not part of CI). Usage there:
#   bash gpu/device_check.sh            (expects pinned wheels in .whl/ and writes results under $OUT)
#   QUICK=1 bash gpu/device_check.sh    (only the single-GPU training run and the QLoRA / TRL-docs memory pair)
# Each part runs on its own; a failure is recorded and the next part still runs.
set -u
FINAL=${OUT:-/tmp/gpu_out}; OUT=/tmp/gpu_res; mkdir -p "$OUT" "$FINAL"   # packed into $FINAL/results.tgz at the end
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
PY=python3
part() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$(date +%s); ( timeout "$limit" "$@" ) > "$OUT/$name.log" 2>&1; local rc=$?;
         echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"; tail -n 8 "$OUT/$name.log";
         tar czf "$FINAL/results.tgz" -C "$OUT" . ; }  # after every part: a cut-off run still returns its results

part env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import torch, transformers, peft, trl, bitsandbytes, datasets, accelerate; print(torch.__version__, torch.cuda.is_available(), transformers.__version__, peft.__version__, trl.__version__, bitsandbytes.__version__, datasets.__version__, accelerate.__version__)'"

# A Qwen3-0.6B-architecture model with random weights (real sizes; the tokenizer is the project's small BPE).
part build_model 90 $PY - <<'PY'
import sys
from qlora.model.fixtures import architecture_dimensions, build_random_model, tokenizer_corpus, train_bpe_tokenizer
tok = train_bpe_tokenizer(tokenizer_corpus(), 512)
build_random_model("/tmp/models/Qwen3-0.6B", tok, **architecture_dimensions("Qwen3-0.6B"))
build_random_model("/tmp/models/Qwen3-tiny", tok)
print("built")
PY

# The training script on CUDA, single GPU, QLoRA r=64, seq 512, the default optimizer (paged_adamw_8bit).
part train_cuda 100 $PY Fine-tuning/01_Train.py --MODEL_NAME=/tmp/models/Qwen3-0.6B --DATASET_PATH=samples/openmath_sample.jsonl \
  --OUTPUT_ROOT=/tmp/runs/cuda --lora_r=64 --max_steps=20 --per_device_train_batch_size=1 --gradient_accumulation_steps=1 \
  --max_seq_length=512 --logging_steps=5 --eval_samples=8
part train_cuda_meta 30 $PY -c "
import json; m = json.load(open('/tmp/runs/cuda/Qwen3-0.6B-openmath_SFT_LoRa64_QLORA_w4_headbf16/metadata.json'))
print(json.dumps({k: m[k] for k in ('quantization', 'artifact', 'merge_check', 'peak_memory', 'parameters')}, indent=1))
print('train_seconds', m['training']['train_seconds'], 'steps', m['training']['steps'])"
cp /tmp/runs/cuda/*/metadata.json "$OUT/train_cuda_metadata.json" 2>/dev/null

if [ "${QUICK:-0}" = 1 ]; then  # a short re-check: the single-GPU run above plus the QLoRA-vs-TRL-docs pair
  part benchmark_quick 150 python3 tools/benchmark.py --arch Qwen3-0.6B --seq 2048 --batch 1 --rank 64 --steps 3 \
    --warmup 1 --cases trl_docs_qlora,qlora --work-dir /tmp/bench --out "$OUT/bench_quick.json"
  echo "=== done"; cat "$OUT/summary.txt"; exit 0
fi

# FSDP-QLoRA through accelerate launch (one GPU here: world size 1 exercises the FSDP path:
# bf16 quant storage, sharded wrapping, full-state-dict adapter save, merge from the saved adapter).
part fsdp 100 accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 1 Fine-tuning/01_Train.py \
  --MODEL_NAME=/tmp/models/Qwen3-0.6B --DATASET_PATH=samples/openmath_sample.jsonl --OUTPUT_ROOT=/tmp/runs/fsdp \
  --optim=adamw_torch --lora_r=64 --max_steps=10 --per_device_train_batch_size=1 --gradient_accumulation_steps=1 \
  --max_seq_length=512 --logging_steps=5 --eval_samples=8
cp /tmp/runs/fsdp/*/metadata.json "$OUT/fsdp_metadata.json" 2>/dev/null

# tools/benchmark.py on CUDA (Qwen3-0.6B architecture, seq 2048, r=64 and r=256, TRL-docs baseline).
part benchmark 240 env OUT="$OUT/benchmark" bash gpu/benchmark_check.sh
echo "=== done"; cat "$OUT/summary.txt"
tar czf "$FINAL/results.tgz" -C "$OUT" . && cp "$OUT/summary.txt" "$FINAL/"
