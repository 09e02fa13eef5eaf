#!/usr/bin/env bash
# Will-it-fit checks for a lent CUDA machine (not part of CI; not yet run). Usage there:
#   bash gpu/fit_check.sh        (writes results under $OUT)
# 1. boundary: a Qwen3-1.7B-architecture model (random weights) trained with the GPU capped by
#    torch.cuda.set_per_process_memory_fraction at 1.15x the planned peak (must finish), and refused by the
#    planner when memory_limit_gb is 0.9x the plan (one error line, nothing written);
# 2. the Qwen3-8B r=64 seq 2048 plan in 8 GiB (docs/measurements.md): measured max allocated for training alone.
set -u
FINAL=${OUT:-/tmp/gpu_out}; mkdir -p "$FINAL"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
$PY - <<'PY' 2>&1 | tee "$FINAL/fit_check.log"
import json, os, runpy, subprocess, sys
import torch
from qlora.config import training_defaults
from qlora.planner.memory import plan_for_train_config
from qlora.model.fixtures import (architecture, architecture_dimensions, build_random_model, tokenizer_corpus,
                                  train_bpe_tokenizer)

tok = train_bpe_tokenizer(tokenizer_corpus(), 512)
results = {}
for arch, r, seq in (("Qwen3-1.7B", 64, 1024), ("Qwen3-8B", 64, 2048)):
    model_dir = f"/tmp/models/{arch}"
    build_random_model(model_dir, tok, architecture(arch)["model_type"], **architecture_dimensions(arch))
    args = [f"--MODEL_NAME={model_dir}", "--DATASET_PATH=samples/openmath_sample.jsonl", f"--lora_r={r}",
            f"--max_seq_length={seq}", "--max_steps=5", "--gradient_accumulation_steps=1", "--eval_samples=8",
            "--merge_after_train=false", f"--OUTPUT_ROOT=/tmp/runs/{arch}"]
    cfg = {**training_defaults(), "lora_r": r, "max_seq_length": seq, "merge_after_train": False}
    planned = plan_for_train_config(architecture(arch), cfg, "cuda")["peak_bytes"] / 1024**3
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    code = ("import sys, runpy, torch; torch.cuda.set_per_process_memory_fraction(%f); sys.argv = ['01_Train.py'] + %r;"
            "runpy.run_path('Fine-tuning/01_Train.py', run_name='__main__')") % (min(1.0, 1.15 * planned / total), args + ["--memory_limit_gb=off"])
    capped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    refused = subprocess.run([sys.executable, "Fine-tuning/01_Train.py", *args, f"--memory_limit_gb={0.9 * planned:.2f}"],
                             capture_output=True, text=True)
    results[arch] = {"planned_gib": round(planned, 3), "capped_at_gib": round(1.15 * planned, 3),
                     "capped_rc": capped.returncode, "capped_tail": capped.stderr.strip().splitlines()[-3:],
                     "refused_rc": refused.returncode,
                     "refused_error": [l for l in refused.stderr.splitlines() if l.startswith("error:")]}
    print(json.dumps({arch: results[arch]}, indent=1), flush=True)
json.dump(results, open(os.path.join(os.environ.get("OUT", "/tmp/gpu_out"), "fit_check.json"), "w"), indent=1)
PY
