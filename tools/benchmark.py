"""Measured memory and speed of weight formats and training setups, side by side, in one run.

Every configuration runs in its own Python process (so one peak never leaks into another); the parent
builds a random-weight model of the named architecture once (or takes --model), runs the configurations
one after the other, and prints one table with the planner's prediction and its error beside each
measurement, and a throughput table (tokens/s, model FLOPs utilization, memory, loss).

    python tools/benchmark.py --arch Qwen3-0.6B --seq 512 --rank 64 --batch 1 --out bench.json
    python tools/benchmark.py --cases throughput --seq 2048 --rank 256 --out throughput.json

Peak memory: CUDA max allocated / reserved over all GPUs when CUDA is present; else the peak RSS of
the whole worker process (imports, loading and training together). A step is one optimizer step
(gradient_accumulation_steps micro-batches); its time runs from the end of the step before (so data
loading and the optimizer count) and is the mean over the measured steps after the warm-up steps;
tokens/s counts the tokens of the step's batches (padding excluded). Model FLOPs and utilization:
throughput.training_flops over the rows of each measured step, against throughput.PEAK_BF16_TFLOPS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from qlora.bench.cases import CASE_GROUPS, CASES_BY_NAME, Case, benchmark_architecture, build_model, skip_reason
from qlora.bench.report import annotate, read_reports, render_tables, write_report
from qlora.core.files import REPO_ROOT

# unsloth patches transformers, peft and trl as they import: its worker imports it before anything else
UNSLOTH_FIRST = "import unsloth; from qlora.bench.worker import main; main()"


def worker_env(case: Case, unsloth_site: str | None, work_dir: Path) -> dict:
    """A worker's environment: unsloth's case sees its own packages (--unsloth-site) instead of the project's
    extra ones (PYTHONPATH), and compiles its kernels into the work directory."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if case.recipe == "unsloth":
        env.update(PYTHONPATH=str(Path(unsloth_site).resolve()), HF_HUB_OFFLINE="1",
                   UNSLOTH_COMPILE_LOCATION=str(work_dir.resolve() / "unsloth_compiled_cache"))
    return env


def worker_command(case: Case, args, model_dir: Path) -> list[str]:
    """The worker process of one case (qlora.bench.worker), every path absolute."""
    entry = ["-c", UNSLOTH_FIRST] if case.recipe == "unsloth" else ["-m", "qlora.bench.worker"]
    return [sys.executable, *entry, f"--case={case.name}", f"--model-dir={model_dir.resolve()}", f"--seq={args.seq}",
            f"--batch={args.batch}", f"--rank={args.rank}", f"--steps={args.steps}", f"--warmup={args.warmup}",
            f"--work-dir={Path(args.work_dir).resolve()}"]


def run_case(case: Case, args, model_dir: Path) -> dict:
    """One case in its own process (so one peak never leaks into another): its result, or why it was skipped
    or failed."""
    reason = skip_reason(case, args.unsloth_site)
    if reason:
        return {"case": asdict(case), "skipped": reason}
    work_dir = Path(args.work_dir)
    started = time.time()
    log_path = work_dir / f"{case.name}.log"
    with open(log_path, "w") as log:
        try:
            # run from the repository: -m and -c put the working directory first on sys.path, so the worker
            # imports this checkout's qlora even where its PYTHONPATH is replaced (unsloth's case)
            proc = subprocess.run(worker_command(case, args, model_dir), stdout=subprocess.PIPE, stderr=log, text=True,
                                  timeout=args.case_timeout, env=worker_env(case, args.unsloth_site, work_dir),
                                  cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            return {"case": asdict(case), "failed": f"timed out after {args.case_timeout} s (log: {log_path})"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (log_path.read_text().strip().splitlines() or ["no output"])[-1]
        return {"case": asdict(case), "failed": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.time() - started
    return result


# ----- the command line -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="Qwen3-0.6B", help="architecture built with random weights (configs/models)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of the built model (default: the architecture's own); widths and "
                             "vocabulary stay the published ones")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (every row is at least this long)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (cases with their own batch keep it)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank for LoRA and QLoRA")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per training case")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    parser.add_argument("--cases", default="all", help="comma-separated case names, or a group ("
                        + ", ".join(CASE_GROUPS) + "): " + ", ".join(CASES_BY_NAME))
    parser.add_argument("--model", default=None,
                        help="an existing model directory to measure instead of building --arch (e.g. a tiny model)")
    parser.add_argument("--work-dir", default="/tmp/qlora-benchmark", help="where the random model and scratch go")
    parser.add_argument("--case-timeout", type=int, default=None,
                        help="seconds one case may run before it is stopped and recorded as failed (default: no limit)")
    parser.add_argument("--unsloth-site", default=None,
                        help="directory holding unsloth and its package versions (pip install --target); "
                             "the unsloth case runs with it as PYTHONPATH")
    parser.add_argument("--out", default=None, help="write every result (JSON) here")
    parser.add_argument("--from-json", default=None,
                        help="only print the tables of earlier runs' --out files (comma-separated: results merged)")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> list[str]:
    """The case names asked; a bad option exits (usage, status 2) before anything is built."""
    names = [name for part in args.cases.split(",") if part.strip()
             for name in CASE_GROUPS.get(part.strip(), (part.strip(),))]
    unknown = [n for n in names if n not in CASES_BY_NAME]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; allowed: {', '.join(CASES_BY_NAME)}")
    for name in ("seq", "batch", "rank", "steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; give a model directory")
    return names


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        report = read_reports(args.from_json.split(","))
        print(render_tables(report))
        return report
    names = check_args(parser, args)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = Path(args.work_dir) / (args.arch + (f"-{args.layers}layers" if args.layers else ""))
        build_model(benchmark_architecture(args.arch, args.layers), model_dir)
    header = {"arch": model_dir.name if args.model else args.arch, "layers": args.layers, "seq": args.seq,
              "batch": args.batch, "rank": args.rank, "steps": args.steps, "warmup": args.warmup,
              "model_config": json.loads((model_dir / "config.json").read_text()) if args.model else None}
    results = []
    for name in names:
        result = run_case(CASES_BY_NAME[name], args, model_dir)
        results.append(result)
        if args.out:  # after every case, so an interrupted run keeps what it measured
            write_report(args.out, {**header, "results": results})
        brief = {k: v for k, v in result.items() if k not in ("case", "footprint", "step_rows", "step_flops")}
        print(json.dumps({"case": name, **brief}), flush=True)
    report = annotate({**header, "results": results})
    if args.out:
        write_report(args.out, report)
    print(render_tables(report))
    return report


if __name__ == "__main__":
    main()
