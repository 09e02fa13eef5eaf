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
import subprocess
import sys
import time
from pathlib import Path

from qlora.core.files import write_json
from qlora.demo import (FIRST_SEED, METHODS, NOISE_NOTE, DemoSettings, default_base, learning_rates, parse_methods,
                        summarize, summary_table, train_args, write_method_chart)
from qlora.evaluation import EvalOptions, evaluate_dirs

ROOT = Path(__file__).resolve().parent.parent


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


# ----- the command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The demo's options, with qlora.demo.DemoSettings' defaults (tools/compare_lora_variants.py trains on them)."""
    rates = ", ".join(f"{name} {m.learning_rate:g}" for name, m in METHODS.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="qlora", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--base", default=default_base(), help="base model directory (tools/make_base_model.py)")
    parser.add_argument("--data", required=True, help="openmath-schema .jsonl (tools/make_samples.py --rows N)")
    parser.add_argument("--out-root", default="outputs/demo", help="each run trains into OUT_ROOT/METHOD/seedN/")
    parser.add_argument("--train-rows", type=int, default=DemoSettings.train_rows,
                        help="training rows (held-out rows are extra)")
    parser.add_argument("--eval-rows", type=int, default=DemoSettings.eval_rows,
                        help="held-out rows, scored for every model")
    parser.add_argument("--steps", type=int, default=DemoSettings.steps, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=DemoSettings.batch_size, help="sequences per step")
    parser.add_argument("--lr", help=f"METHOD=RATE[,METHOD=RATE...]: override a method's learning rate "
                                     f"(defaults: {rates})")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method, seeds FIRST_SEED, FIRST_SEED+1, ...")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED, help="seed of each method's first run")
    parser.add_argument("--lora-r", type=int, default=DemoSettings.lora_r, help="LoRA rank (alpha = 2 * r)")
    parser.add_argument("--max-new-tokens", type=int, default=DemoSettings.max_new_tokens,
                        help="generation limit when evaluating")
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
    results = evaluate_dirs([args.base, *(r["directory"] for r in runs)],
                            EvalOptions(dataset="openmath", dataset_path=args.data, max_new_tokens=args.max_new_tokens,
                                        chart=str(out_root / "eval_comparison.png")))
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
