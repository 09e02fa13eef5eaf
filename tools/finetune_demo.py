"""Fine-tune the project's small base model on its arithmetic word-problem task and show what it learned.

For each method asked (qlora: 4-bit NF4 base + LoRA; lora: bf16 base + LoRA; full: full fine-tuning),
runs Fine-tuning/01_Train.py with the same data, steps, batch and sequence length, each method at its
own learning rate (METHODS; chosen by the sweep in docs/measurements.md, "The demo"), once per seed.
Then evaluates the base model once and every fine-tuned model on its run's held-out split with
tools/evaluate.py, and prints one row per method: accuracy mean, spread over seeds, and the binomial
standard error of one run's accuracy (the noise of a single run). scripts/demo.sh runs it with the
default (qlora, one seed, 100 held-out rows); `--methods qlora,lora,full --seeds 3 --eval-rows 1000` is the
side-by-side comparison of docs/measurements.md.
Writes OUT_ROOT/comparison.json (every run's command and figures) and OUT_ROOT/accuracy.png.
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from qlora.core.files import write_json
from tools.evaluate import main as evaluate
from tools.evaluate import write_method_chart
from tools.make_base_model import DEFAULT_DIR

FIRST_SEED = 42  # seed of a method's first run; run k uses FIRST_SEED + k (split, initialisation, shuffling)


@dataclass(frozen=True)
class Method:
    label: str
    overrides: tuple[str, ...]  # 01_Train.py arguments that make the method
    learning_rate: float  # the rate the demo trains it at (docs/measurements.md, "Learning rate per method")


METHODS = {
    "qlora": Method("QLoRA (NF4 base)", ("--QUANT_METHOD=QLORA", "--PEFT_CONFIG=LoRa"), 4e-3),
    "lora": Method("LoRA (bf16 base)", ("--QUANT_METHOD=NONE", "--PEFT_CONFIG=LoRa"), 4e-3),
    # below ~3e-3 (bf16 weights, 600 steps) it learns the answer format but never reads the problem's numbers
    "full": Method("full fine-tuning", ("--QUANT_METHOD=NONE", "--PEFT_CONFIG=Full"), 3e-3),
}


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods {text!r}: give distinct names from {', '.join(METHODS)}")
    return methods


def parse_rates(text: str | None) -> dict[str, float]:
    """`--lr METHOD=RATE[,METHOD=RATE...]` -> {method: rate}; a ValueError says what is wrong."""
    rates: dict[str, float] = {}
    for item in (text or "").split(",") if text else []:
        method, sep, value = item.strip().partition("=")
        try:
            rate = float(value) if sep else float("nan")
        except ValueError:
            rate = float("nan")
        if method not in METHODS or method in rates or not (0 < rate < 1):
            raise ValueError(f"--lr {text!r}: expected METHOD=RATE pairs separated by commas, each method once, "
                             f"from {', '.join(METHODS)}, 0 < RATE < 1 (e.g. --lr qlora=8e-3,full=1e-3)")
        rates[method] = rate
    return rates


def learning_rates(args) -> dict[str, float]:
    """Each method's rate: its METHODS default unless --lr overrides it."""
    return {name: method.learning_rate for name, method in METHODS.items()} | parse_rates(args.lr)


def train_args(args, method: str, out_root: Path, seed: int = FIRST_SEED) -> list[str]:
    """01_Train.py overrides: the same budget for every method; the method and its learning rate differ."""
    return [
        f"--MODEL_NAME={args.base}", "--DATASET_CHOICE=openmath", f"--DATASET_PATH={args.data}",
        f"--max_train_samples={args.train_rows}", f"--eval_samples={args.eval_rows}", f"--max_steps={args.steps}",
        f"--per_device_train_batch_size={args.batch_size}", "--gradient_accumulation_steps=1",
        f"--learning_rate={learning_rates(args)[method]}", "--max_seq_length=128", f"--lora_r={args.lora_r}",
        f"--lora_alpha={2 * args.lora_r}", "--lora_dropout=0.0", "--gradient_checkpointing=false",
        "--optim=adamw_torch", "--logging_steps=20", f"--seed={seed}", f"--OUTPUT_ROOT={out_root}",
        *METHODS[method].overrides,
    ]


def run_training(args, method: str, seed: int) -> dict:
    """Train one method at one seed into OUT_ROOT/METHOD/seedN/; its directory, command and wall time."""
    out_root = Path(args.out_root) / method / f"seed{seed}"
    if out_root.exists() and any(out_root.iterdir()):
        raise SystemExit(f"error: {out_root} is not empty; remove it or pass another --out-root")
    argv = train_args(args, method, out_root, seed)
    print(f"demo     | fine-tuning {method} seed {seed} at learning rate {learning_rates(args)[method]:g} "
          f"({args.steps} steps of {args.batch_size})", flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "Fine-tuning" / "01_Train.py"), *argv])
    if result.returncode != 0:
        raise SystemExit(f"error: 01_Train.py failed for {method} seed {seed} (exit {result.returncode})")
    wall = time.time() - started
    print(f"demo     | {method} seed {seed} trained in {wall:.0f}s", flush=True)
    directory = next(p for p in out_root.iterdir() if not p.name.startswith("."))
    return {"method": method, "seed": seed, "learning_rate": learning_rates(args)[method], "directory": str(directory),
            "train_command": ["python", "Fine-tuning/01_Train.py", *argv], "train_wall_seconds": round(wall, 1)}


# ----- the summary ----------------------------------------------------------------------------------

def binomial_se(accuracy: float, rows: int) -> float:
    """Standard error (points) of one run's accuracy on `rows` rows at this accuracy (%)."""
    p = accuracy / 100
    return 100 * math.sqrt(p * (1 - p) / rows)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per method (in first-seen order) from per-run dicts with method, learning_rate, accuracy,
    heldout_loss and rows: mean, sample standard deviation (None for one run), min, max, the binomial
    standard error of one run at the mean accuracy, mean held-out loss."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["method"], []).append(run)
    summary = []
    for method, group in groups.items():
        accuracies = [r["accuracy"] for r in group]
        mean = statistics.mean(accuracies)
        summary.append({
            "method": method, "learning_rate": group[0]["learning_rate"], "n": len(group),
            "seeds": [r["seed"] for r in group], "accuracy_mean": mean,
            "accuracy_sample_std": statistics.stdev(accuracies) if len(group) > 1 else None,
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies), "rows": group[0]["rows"],
            "one_run_se": binomial_se(mean, group[0]["rows"]),
            "heldout_loss_mean": statistics.mean(r["heldout_loss"] for r in group)})
    return summary


def summary_table(summary: list[dict]) -> str:
    labels = {"base": "base model", **{name: m.label for name, m in METHODS.items()}}
    lines = ["| model | learning rate | runs (seeds) | accuracy % mean | sample std | min-max | SE of one run | "
             "held-out loss mean | held-out rows |", "|" + "---|" * 9]
    for s in summary:
        std = f"{s['accuracy_sample_std']:.1f}" if s["accuracy_sample_std"] is not None else "-"
        rate = f"{s['learning_rate']:g}" if s["learning_rate"] is not None else "-"
        lines.append(
            f"| {labels[s['method']]} | {rate} | {s['n']} ({', '.join(map(str, s['seeds']))}) | "
            f"{s['accuracy_mean']:.1f} | {std} | {s['accuracy_min']:.1f}-{s['accuracy_max']:.1f} | "
            f"{s['one_run_se']:.1f} | {s['heldout_loss_mean']:.3f} | {s['rows']} |")
    return "\n".join(lines)


NOISE_NOTE = ("SE of one run: binomial standard error of one run's accuracy on that many rows at the mean accuracy; "
              "two single runs differing by less than about 2 x sqrt(2) x SE are within the noise of the rows "
              "alone, and runs of one method also differ from seed to seed. Each seed has its own "
              "held-out split (split seed = training seed); the base model is scored once, on the first seed's split.")


# ----- the command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The demo's options; tools/compare_lora_variants.py reads its training settings from the same defaults."""
    rates = ", ".join(f"{name} {m.learning_rate:g}" for name, m in METHODS.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="qlora", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--base", default=os.path.relpath(DEFAULT_DIR),  # relative: adapter/ then names a portable path
                        help="base model directory (tools/make_base_model.py)")
    parser.add_argument("--data", required=True, help="openmath-schema .jsonl (tools/make_samples.py --rows N)")
    parser.add_argument("--out-root", default="outputs/demo", help="each run trains into OUT_ROOT/METHOD/seedN/")
    parser.add_argument("--train-rows", type=int, default=1500, help="training rows (held-out rows are extra)")
    parser.add_argument("--eval-rows", type=int, default=100, help="held-out rows, scored for every model")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", help=f"METHOD=RATE[,METHOD=RATE...]: override a method's learning rate "
                                     f"(defaults: {rates})")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method, seeds FIRST_SEED, FIRST_SEED+1, ...")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED, help="seed of each method's first run")
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank (alpha = 2 * r)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="generation limit when evaluating")
    return parser


def check_args(args) -> list[str]:
    """The methods asked; every bad option is one line before any training."""
    methods = parse_methods(args.methods)
    learning_rates(args)
    for name in ("seeds", "steps", "batch_size", "train_rows", "eval_rows", "lora_r", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not (Path(args.base) / "config.json").is_file():
        raise ValueError(f"no base model at {args.base}; build it with tools/make_base_model.py")
    if not Path(args.data).is_file():
        raise ValueError(f"no data file {args.data}; write one with tools/make_samples.py")
    return methods


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        methods = check_args(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    started = time.time()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = [run_training(args, method, seed) for seed in seeds for method in methods]
    out_root = Path(args.out_root)
    results = evaluate([args.base, *(r["directory"] for r in runs), "--dataset=openmath", f"--dataset-path={args.data}",
                        f"--max-new-tokens={args.max_new_tokens}", f"--chart={out_root / 'eval_comparison.png'}"])
    base, trained = results[0], results[1:]
    runs = [{**run, **{k: r[k] for k in ("accuracy", "heldout_loss", "rows", "load_kind")}}
            for run, r in zip(runs, trained)]
    base_run = {"method": "base", "seed": base["dataset"]["seed"], "learning_rate": None,
                **{k: base[k] for k in ("accuracy", "heldout_loss", "rows", "load_kind")}}
    summary = summarize([base_run, *runs])
    print(f"\n{summary_table(summary)}\n\n{NOISE_NOTE}")
    write_method_chart(summary, runs, out_root / "accuracy.png")
    write_json(out_root / "comparison.json", {
        "command": ["python", "tools/finetune_demo.py", *(argv if argv is not None else sys.argv[1:])],
        "settings": {k: v for k, v in vars(args).items()}, "learning_rates": learning_rates(args),
        "summary": summary, "runs": runs, "base": base_run})
    print(f"\nchart: {out_root / 'accuracy.png'}; every run: {out_root / 'comparison.json'}")
    print(f"demo     | done in {time.time() - started:.0f}s (fine-tuning + evaluation)")
    return {"summary": summary, "runs": runs, "results": results}


if __name__ == "__main__":
    main()
