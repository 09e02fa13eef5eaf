"""Fine-tune the project's small base model on its arithmetic word-problem task and show what it learned.

For each method asked (qlora: 4-bit NF4 base + LoRA; lora: bf16 base + LoRA; full: full fine-tuning),
runs Fine-tuning/01_Train.py with the same data, steps, batch and sequence length, then evaluates the
base model and every fine-tuned model on the same held-out split with tools/evaluate.py and prints
one table. scripts/demo.sh runs it with the default (qlora only); `--methods qlora,lora,full` is the
side-by-side comparison.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.evaluate import main as evaluate  # noqa: E402
from tools.make_base_model import DEFAULT_DIR  # noqa: E402

METHODS = {
    "qlora": ["--QUANT_METHOD=QLORA", "--PEFT_CONFIG=LoRa"],
    "lora": ["--QUANT_METHOD=NONE", "--PEFT_CONFIG=LoRa"],
    "full": ["--QUANT_METHOD=NONE", "--PEFT_CONFIG=Full"],
}


def train_args(args, method: str, out_root: Path) -> list[str]:
    """01_Train.py overrides: the same budget for every method; only the method (and Full's LR) differs."""
    lr = args.full_lr if method == "full" else args.lr
    return [
        f"--MODEL_NAME={args.base}", "--DATASET_CHOICE=openmath", f"--DATASET_PATH={args.data}",
        f"--max_train_samples={args.train_rows}", f"--eval_samples={args.eval_rows}", f"--max_steps={args.steps}",
        f"--per_device_train_batch_size={args.batch_size}", "--gradient_accumulation_steps=1",
        f"--learning_rate={lr}", "--max_seq_length=128", f"--lora_r={args.lora_r}", f"--lora_alpha={2 * args.lora_r}",
        "--lora_dropout=0.0", "--gradient_checkpointing=false", "--optim=adamw_torch", "--logging_steps=20",
        "--seed=42", f"--OUTPUT_ROOT={out_root}", *METHODS[method],
    ]


def run_training(args, method: str) -> Path:
    out_root = Path(args.out_root) / method
    if out_root.exists() and any(out_root.iterdir()):
        raise SystemExit(f"error: {out_root} is not empty; remove it or pass another --out-root")
    print(f"demo     | fine-tuning {method} ({args.steps} steps of {args.batch_size})", flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "Fine-tuning" / "01_Train.py"), *train_args(args, method, out_root)])
    if result.returncode != 0:
        raise SystemExit(f"error: 01_Train.py failed for {method} (exit {result.returncode})")
    print(f"demo     | {method} trained in {time.time() - started:.0f}s", flush=True)
    return next(p for p in out_root.iterdir() if not p.name.startswith("."))


def build_parser() -> argparse.ArgumentParser:
    """The demo's options; tools/compare_lora_variants.py reads its training settings from the same defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="qlora", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--base", default=os.path.relpath(DEFAULT_DIR),  # relative: adapter/ then names a portable path
                        help="base model directory (tools/make_base_model.py)")
    parser.add_argument("--data", required=True, help="openmath-schema .jsonl (tools/make_samples.py --rows N)")
    parser.add_argument("--out-root", default="outputs/demo", help="each method trains into OUT_ROOT/METHOD/")
    parser.add_argument("--train-rows", type=int, default=1500, help="training rows (held-out rows are extra)")
    parser.add_argument("--eval-rows", type=int, default=100, help="held-out rows, scored for every model")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=4e-3, help="learning rate of the LoRA methods")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="learning rate of full fine-tuning")
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank (alpha = 2 * r)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="generation limit when evaluating")
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"error: unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
    if not (Path(args.base) / "config.json").is_file():
        raise SystemExit(f"error: no base model at {args.base}; build it with tools/make_base_model.py")
    if not Path(args.data).is_file():
        raise SystemExit(f"error: no data file {args.data}; write one with tools/make_samples.py")
    started = time.time()
    dirs = [run_training(args, method) for method in methods]
    results = evaluate([args.base, *map(str, dirs), "--dataset=openmath", f"--dataset-path={args.data}",
                        f"--max-new-tokens={args.max_new_tokens}", f"--chart={Path(args.out_root) / 'accuracy.png'}"])
    print(f"\ndemo     | done in {time.time() - started:.0f}s (fine-tuning + evaluation)")
    return results


if __name__ == "__main__":
    main()
