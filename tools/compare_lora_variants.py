"""Measure what LoRA rank, scaling, initialisation and DoRA give on a 4-bit base, one change per cell.

Every cell trains with Fine-tuning/01_Train.py on the demo's settings (tools/finetune_demo.py: base model,
steps, batch, sequence length, optimizer) at learning rate LEARNING_RATE, with `lora_alpha` fixed (the
script's default, 16) instead of the demo's 2 * r, so the scale is alpha / r, or alpha / sqrt(r) with rsLoRA. Then
tools/evaluate.py scores the run on its own held-out split. One JSON record per run goes into --json-out
(runs already recorded there are skipped, so an interrupted comparison continues where it stopped);
--table prints the markdown table of a JSON file without running anything.

    python tools/compare_lora_variants.py --task demo --data DIR/openmath_sample.jsonl --json-out runs.json
    python tools/compare_lora_variants.py --table runs.json
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qlora.config import training_defaults
from qlora.core.files import write_json
from qlora.demo import DemoSettings, train_args
from qlora.evaluation import MAIN_METRIC, EvalOptions, evaluate_dirs

ROOT = Path(__file__).resolve().parent.parent

# cell name -> the 01_Train.py overrides that make it (on top of the demo's settings and lora_alpha)
CELLS = {
    **{f"r{r}{suffix}": [f"--lora_r={r}", f"--use_rslora={rs}"]
       for r in (16, 64, 256) for suffix, rs in (("", "false"), ("-rslora", "true"))},
    "r64-loftq": ["--lora_r=64", "--use_rslora=false", "--init_lora_weights=loftq"],
    "r64-dora": ["--lora_r=64", "--use_rslora=false", "--PEFT_CONFIG=DoRa"],
}
TASKS = ("demo", "squad")
LEARNING_RATE = 4e-3  # every cell's default rate, whatever the demo's QLoRA default: the measured table used it


def cell_args(args, task: str, cell: str, seed: int, out_root: Path) -> list[str]:
    """01_Train.py's arguments for one run: the demo's, then this comparison's (later overrides win)."""
    demo = DemoSettings(data=str(args.data), steps=args.steps, lr=f"qlora={args.learning_rate}")
    dataset = [] if task == "demo" else [f"--DATASET_CHOICE={task}", f"--DATASET_PATH={args.data}"]
    return [*train_args(demo, "qlora", out_root, seed), *dataset, f"--lora_alpha={args.lora_alpha}", *CELLS[cell]]


def _children_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children: unlike wall time on a shared machine, it
    hardly depends on what else runs (the whole 01_Train.py run: loading, training, merge and its check)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cell(args, task: str, cell: str, seed: int) -> dict:
    out_root = Path(args.out_root) / task / f"{cell}-seed{seed}"
    shutil.rmtree(out_root, ignore_errors=True)
    argv = cell_args(args, task, cell, seed, out_root)
    load_before = os.getloadavg()[0]
    started, cpu_before = time.time(), _children_cpu_seconds()
    result = subprocess.run([sys.executable, str(ROOT / "Fine-tuning" / "01_Train.py"), *argv],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {cell} seed {seed} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    wall, cpu = time.time() - started, _children_cpu_seconds() - cpu_before
    (directory,) = [p for p in out_root.iterdir() if not p.name.startswith(".")]
    meta = json.loads((directory / "metadata.json").read_text())
    scores = evaluate_dirs([str(directory)], EvalOptions(dataset="openmath" if task == "demo" else task,
                                                         dataset_path=args.data, max_new_tokens=args.max_new_tokens))[0]
    training = meta["training"]
    return {
        "task": task, "cell": cell, "seed": seed, "command": ["python", "Fine-tuning/01_Train.py", *argv],
        "peft": meta["peft"], "peft_options": meta["peft_options"], "trainable_params": meta["parameters"]["trainable"],
        "steps": training["steps"], "train_seconds": training["train_seconds"],
        "step_seconds": training["train_seconds"] / training["steps"], "run_wall_seconds": round(wall, 1),
        "run_cpu_seconds": round(cpu, 1), "cpu_seconds_per_step": cpu / training["steps"],
        "load_average_before": load_before, "train_loss": training["train_loss"], "eval_loss": training["eval_loss"],
        "merge_check": {k: meta["merge_check"][k] for k in ("passed", "mean_kl", "max_abs_logit_diff")},
        "peak_rss_gib": meta["peak_memory"].get("peak_rss_gib"),
        "evaluated_as": scores["load_kind"], "heldout_loss": scores["heldout_loss"],
        **{m: scores[m] for m in ("accuracy", "exact_match", "f1") if m in scores},
    }


def markdown_table(records: list[dict]) -> str:
    """One row per (task, cell): the main metric and held-out loss per seed and their mean, step time, memory."""
    lines = ["| task | cell | scale | trainable | main metric per seed (mean) | held-out loss per seed (mean) | "
             "s/step per seed (wall) | CPU s/step per seed (whole run) | peak RSS GiB | merge KL (max) |",
             "|" + "---|" * 10]
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record["cell"]), []).append(record)
    for (task, cell), runs in sorted(groups.items(), key=lambda kv: (TASKS.index(kv[0][0]), list(CELLS).index(kv[0][1]))):
        runs.sort(key=lambda r: r["seed"])
        metric = MAIN_METRIC["openmath" if task == "demo" else task]
        values, losses = [r[metric] for r in runs], [r["heldout_loss"] for r in runs]
        step_times = " / ".join(f"{r['step_seconds']:.3f}" for r in runs)
        cpu_times = " / ".join(f"{r['cpu_seconds_per_step']:.3f}" for r in runs)
        lines.append(
            f"| {task} | {cell} | {runs[0]['peft_options']['scaling']:.4g} | {runs[0]['trainable_params']:,} | "
            f"{metric} {' / '.join(f'{v:.1f}' for v in values)} (**{statistics.mean(values):.1f}**) | "
            f"{' / '.join(f'{v:.3f}' for v in losses)} ({statistics.mean(losses):.3f}) | "
            f"{step_times} | {cpu_times} | {max(r['peak_rss_gib'] for r in runs):.2f} | "
            f"{max(r['merge_check']['mean_kl'] for r in runs):.2g} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, help="demo (openmath schema) or squad (squad schema)")
    parser.add_argument("--data", help="the task's .jsonl (tools/make_samples.py --rows 1600 --seed 1 writes both)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from: {', '.join(CELLS)}")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds (split, adapter init and shuffling)")
    parser.add_argument("--steps", type=int, default=DemoSettings.steps, help="optimizer steps per run")
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE,
                        help="every run's learning rate (record other rates in their own --json-out)")
    parser.add_argument("--lora-alpha", type=int, default=training_defaults()["lora_alpha"],
                        help="lora_alpha of every run (default: Fine-tuning/01_Train.py's)")
    parser.add_argument("--max-new-tokens", type=int, default=DemoSettings.max_new_tokens,
                        help="generation limit when evaluating")
    parser.add_argument("--out-root", default="outputs/lora_variants", help="runs train into OUT_ROOT/TASK/CELL-seedN/")
    parser.add_argument("--json-out", help="JSON list of run records: appended to, runs already in it skipped")
    parser.add_argument("--table", help="print the markdown table of this JSON file and exit")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.table:
        records = json.loads(Path(args.table).read_text())
        print(markdown_table(records))
        return records
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not args.task or not args.data or not args.json_out:
        raise SystemExit(f"error: --task, --data and --json-out are required; cells from: {', '.join(CELLS)} "
                         f"(unknown: {unknown})")
    if not Path(args.data).is_file():
        raise SystemExit(f"error: no data file {args.data}; write one with tools/make_samples.py --rows 1600 --seed 1")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    json_out = Path(args.json_out)
    records = json.loads(json_out.read_text()) if json_out.exists() else []
    done = {(r["task"], r["cell"], r["seed"]) for r in records}
    for seed in seeds:
        for cell in cells:
            if (args.task, cell, seed) in done:
                continue
            print(f"compare  | {args.task} {cell} seed {seed}", flush=True)
            records.append(run_cell(args, args.task, cell, seed))
            write_json(json_out, records)
    print(markdown_table(records))
    return records


if __name__ == "__main__":
    main()
