"""Measure the merge step's peak memory on a Qwen3-0.6B-architecture model (random weights), vs the
size of its bf16 weights: the streamed merge the training script runs, or the merged model built in memory.

Builds the model from a Qwen3Config with Qwen3-0.6B's sizes (tied embeddings) and a small BPE
tokenizer (the vocabulary size is the real one; the tokenizer is not used), saves it in bf16
safetensors, loads it 4-bit (NF4 + double quant) on this machine's device, wraps it with LoRA on
all seven projections, then runs one merge (`qlora.merge.weights.write_merged` into a temporary directory, or
`merge_lora` with --how in-memory) while a sampler thread reads the process's resident memory. Run each case in
its own process: peak RSS is per process.

    nice -n 10 python tools/measure_merge_memory.py --base dequantized
    nice -n 10 python tools/measure_merge_memory.py --base dequantized --how in-memory
    nice -n 10 python tools/measure_merge_memory.py --base original --work-dir /tmp/qwen3-0.6b-random

Prints one JSON line: memory before the merge (the 4-bit model + adapter), the peak during it, the
bf16 weight size, and their ratios. CPU only measures RSS; with CUDA it also reports peak allocated.
RSS counts what the allocator keeps, not only live tensors: run with MALLOC_MMAP_THRESHOLD_=65536
so that glibc returns freed tensors to the system, else the peak includes freed memory it kept.
"""

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from qlora.core.memory import proc_status_bytes, weight_footprint
from qlora.merge.weights import merge_lora, write_merged
from qlora.model.fixtures import architecture_dimensions, build_random_model, tokenizer_corpus, train_bpe_tokenizer
from qlora.model.loading import load_causal_lm, pick_device
from qlora.train.peft import DEFAULT_TARGET_MODULES
from quantization_utils import build_quantization_plan

RSS_FIELDS = ("RssAnon", "RssFile", "VmRSS")

def rss_bytes() -> dict[str, int]:
    """Current resident memory of this process: anonymous (heap) and file-backed (memory-mapped) pages."""
    return {field: proc_status_bytes(field) or 0 for field in RSS_FIELDS}

class PeakSampler(threading.Thread):
    """Samples rss_bytes() every `interval` seconds; keeps the maximum of each field."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, rss_bytes(), True

    def run(self):
        while self.running:
            for key, value in rss_bytes().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self.running = False
        self.join()
        return self.peak

def build_model(directory: Path) -> None:
    """Qwen3-0.6B-architecture model with random weights, bf16 safetensors, and a small tokenizer."""
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(50), 512)
    build_random_model(directory, tokenizer, **architecture_dimensions("Qwen3-0.6B"))

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=("dequantized", "original"), default="dequantized",
                        help="merge base to measure (run each in its own process)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (the merge's temporaries do not depend on it)")
    parser.add_argument("--how", choices=("streamed", "in-memory"), default="streamed",
                        help="streamed: write_merged, what 01_Train.py runs (one tensor at a time into safetensors); "
                             "in-memory: merge_lora, the merged model built in memory (and not saved)")
    parser.add_argument("--work-dir", default="/tmp/qwen3-0.6b-random",
                        help="where the random model is written (reused when it exists)")
    args = parser.parse_args(argv)

    import gc

    import torch
    from peft import LoraConfig, get_peft_model

    work = Path(args.work_dir) / "Qwen3-0.6B"
    if not (work / "model.safetensors").exists():
        build_model(work)
        gc.collect()
    device = pick_device()
    _, bnb_config = build_quantization_plan("QLORA")
    model = load_causal_lm(str(work), bnb_config, device)
    bf16_bytes = weight_footprint(model)["bf16_bytes"]
    lora = LoraConfig(r=args.lora_r, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES), task_type="CAUSAL_LM",
                      init_lora_weights=False)  # random B: the merge does real work
    model = get_peft_model(model, lora)
    model.eval()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    before = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    started = time.time()
    merged = None  # the in-memory merge's result, held until the peak is read
    if args.how == "streamed":
        with tempfile.TemporaryDirectory(dir=args.work_dir) as out:
            write_merged(model, Path(out), args.base, str(work))
    else:
        merged = merge_lora(model, args.base, str(work))
    seconds = time.time() - started
    peak = sampler.stop()
    del merged
    del model
    after = rss_bytes()
    gb = 1024**3
    report = {
        "base": args.base, "how": args.how, "device": device, "lora_r": args.lora_r, "merge_seconds": round(seconds, 2),
        "bf16_weights_gib": round(bf16_bytes / gb, 3),
        "rss_before_gib": round(before["VmRSS"] / gb, 3), "rss_peak_gib": round(peak["VmRSS"] / gb, 3),
        "rss_after_gib": round(after["VmRSS"] / gb, 3),
        "anon_before_gib": round(before["RssAnon"] / gb, 3), "anon_peak_gib": round(peak["RssAnon"] / gb, 3),
        "file_peak_gib": round(peak["RssFile"] / gb, 3),
        "merge_extra_anon_gib": round((peak["RssAnon"] - before["RssAnon"]) / gb, 3),
        "merge_extra_over_bf16": round((peak["RssAnon"] - before["RssAnon"]) / bf16_bytes, 3),
        "peak_rss_over_bf16": round(peak["VmRSS"] / bf16_bytes, 3),
        "peak_anon_over_bf16": round(peak["RssAnon"] / bf16_bytes, 3),
    }
    if device == "cuda":
        report["cuda_before_gib"] = round(cuda_before / gb, 3)
        report["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / gb, 3)
        report["cuda_peak_over_bf16"] = round(torch.cuda.max_memory_allocated() / bf16_bytes, 3)
    report["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    print(json.dumps(report))
    return report

if __name__ == "__main__":
    main()
