"""Measured memory and speed of weight formats and training setups, side by side, in one run.

Every configuration runs in its own Python process (so one peak never leaks into another); the parent
builds a random-weight model of the named architecture once, runs the configurations one after the
other, and prints one table with the planner's prediction and its error beside each measurement.

    python tools/benchmark.py --arch Qwen3-0.6B --seq 512 --rank 64 --batch 1 --out bench.json

Peak memory: CUDA max allocated / reserved over all GPUs when CUDA is present; else the peak RSS of
the whole worker process (imports, loading and training together). Step time is the mean of the
measured steps after the warm-up steps; tokens/s counts the tokens of the batch (padding excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

@dataclass(frozen=True)
class Case:
    """One configuration the benchmark runs in its own process."""

    name: str
    kind: str  # weights | train
    quant: str | None = None  # None (bf16) | nf4 | nf4_dq | fp4
    peft: str = "lora"  # lora | full
    recipe: str = "project"  # project (01_Train.py's path) | trl_docs (the recipe TRL's docs show)
    gradient_checkpointing: bool = True
    fused_loss: bool = True  # TRL's chunked LM head + loss; False = full logits through a compute_loss_func
    embeddings_bf16: bool = True  # project QLoRA: keep the frozen embedding/head bf16 after kbit prep
    padding_free: bool = False
    variable_lengths: bool = False  # rows of mixed length (for the padding-free lever)
    liger: bool = False  # CUDA only
    batch: int | None = None  # None = the run's --batch
    optim: str | None = None  # None: 01_Train.py's default
    note: str = ""

CASES = [
    Case("weights_nf4_dq", "weights", "nf4_dq", note="NF4 + double quant"),
    Case("trl_docs_qlora", "train", "nf4_dq", recipe="trl_docs", optim="paged_adamw_32bit",
         note="baseline: TRL docs recipe"),
    Case("qlora", "train", "nf4_dq", note="project QLoRA (01_Train.py path)"),
    Case("qlora_adamw32", "train", "nf4_dq", optim="paged_adamw_32bit",
         note="lever: 32-bit optimizer state (the recipe's) instead of 8-bit"),
    Case("lora_bf16", "train", None, note="LoRA on a bf16 base"),
    Case("qlora_fp32_embed", "train", "nf4_dq", embeddings_bf16=False,
         note="lever: peft's fp32 upcast of embedding/head kept"),
    Case("full_bf16", "train", None, peft="full", note="full fine-tuning, bf16"),
    Case("qlora_full_logits", "train", "nf4_dq", fused_loss=False,
         note="lever: TRL chunked loss off (full fp32 logits)"),
    Case("qlora_no_gc", "train", "nf4_dq", gradient_checkpointing=False, note="lever: gradient checkpointing off"),
    Case("weights_bf16", "weights", None, note="bf16 weights"),
    Case("weights_nf4", "weights", "nf4", note="NF4, no double quant"),
    Case("weights_fp4", "weights", "fp4", note="FP4, no double quant"),
    Case("qlora_b4_padded", "train", "nf4_dq", variable_lengths=True, batch=4,
         note="lever: mixed lengths, batch 4, padded"),
    Case("qlora_b4_padding_free", "train", "nf4_dq", variable_lengths=True, batch=4, padding_free=True,
         note="lever: mixed lengths, batch 4, padding-free"),
    Case("qlora_liger", "train", "nf4_dq", liger=True, note="lever: Liger kernels (CUDA only)"),
    Case("tokenize_long_row", "tokenize", None,
         note="TRL's dataset preparation of one row of 2,000,000 characters (before truncation)"),
]
LONG_ROW_CHARS = 2_000_000
CASES_BY_NAME = {case.name: case for case in CASES}

# ----- data ---------------------------------------------------------------------------------------------

def long_rows(count: int, min_chars: int, seed: int = 0, variable: bool = False) -> list[dict]:
    """Prompt/completion rows whose completion is at least `min_chars` long, built from the project's
    generated openmath rows. With `variable`, completions of 1/64 to 1/3 of `min_chars` (for the
    benchmark's 8 * seq, about 80 to 500 tokens with its tokenizer: under seq, so nothing is truncated)."""
    import random

    from synthetic_data import generate_rows

    rng = random.Random(seed)
    source = generate_rows("openmath", 50 * count + 50, seed)
    rows = []
    for i in range(count):
        target = rng.randint(min_chars // 64, min_chars // 3) if variable else min_chars
        text, j = "", 0
        while len(text) < target:
            text += source[(i * 50 + j) % len(source)]["generated_solution"] + " "
            j += 1
        rows.append({"prompt": [{"role": "user", "content": source[i]["problem"]}],
                     "completion": [{"role": "assistant", "content": text.strip()}]})
    return rows

# ----- worker: one configuration in this process -------------------------------------------------------

def bnb_config_for(quant: str | None):
    import torch
    from transformers import BitsAndBytesConfig

    if quant is None:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if quant == "fp4" else "nf4",
                              bnb_4bit_use_double_quant=quant == "nf4_dq", bnb_4bit_compute_dtype=torch.bfloat16)

def proc_status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssFile) in GiB; None off Linux."""
    from memory_usage import GIB, proc_status_bytes

    value = proc_status_bytes(field)
    return None if value is None else value / GIB

def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

def measure_weights(case: Case, model_dir: str) -> dict:
    import importlib

    for name in ("datasets", "peft", "trl"):  # the stack a training process has loaded: the planner's runtime term
        importlib.import_module(name)

    from memory_usage import peak_memory_report, weight_footprint
    from model_loading import load_causal_lm, pick_device

    model = load_causal_lm(model_dir, bnb_config_for(case.quant), pick_device())
    footprint = weight_footprint(model)
    bits = footprint["quantized_bytes"] * 8 / footprint["quantized_params"] if footprint["quantized_params"] else 16.0
    return {"weights_gib": footprint["total_bytes"] / 1024**3, "bits_per_quantized_param": bits,
            "quantized_params": footprint["quantized_params"], "footprint": footprint, "peak": peak_memory_report()}

def full_logits_loss(vocab_size: int):
    """The loss every causal LM computes from its full (batch, seq, vocab) logits, upcast to fp32."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss(outputs, labels, num_items_in_batch=None):
        return ForCausalLMLoss(outputs.logits, labels, vocab_size, num_items_in_batch=num_items_in_batch)

    return loss

def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()

def step_timer():
    """Per optimizer step: wall seconds and this process's CPU seconds (all threads). On a shared CPU
    machine the CPU seconds are the fair measure of work; on CUDA the wall time is."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self._start = [], [], (0.0, 0.0)

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self._start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.wall.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.process_time() - self._start[1])
            print(f"step {len(self.wall)}: {self.wall[-1]:.1f}s wall, {self.cpu[-1]:.1f}s cpu", file=sys.stderr, flush=True)

    return StepTimer()

def case_config(case: Case, seq: int, batch: int, rank: int, steps: int) -> dict:
    """01_Train.py's constants as the script has them, with this case's levers and sizes applied."""
    from config_utils import training_defaults

    cfg = training_defaults()
    cfg.update(lora_r=rank, max_seq_length=seq, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
               max_steps=steps, gradient_checkpointing=case.gradient_checkpointing, logging_steps=1000,
               QUANT_METHOD="QLORA" if case.quant else "NONE", PEFT_CONFIG="Full" if case.peft == "full" else "LoRa")
    if case.optim is not None:
        cfg["optim"] = case.optim
    return cfg

def build_trainer(case: Case, model_dir: str, seq: int, batch: int, rank: int, steps: int, work: Path):
    """The model and SFTTrainer of one training case: built by training_setup exactly as 01_Train.py builds
    them, or by TRL's documented recipe (the baseline)."""
    from datasets import Dataset

    from model_loading import load_causal_lm, load_tokenizer, pick_device
    from training_setup import build_trainer as build_project_trainer
    from training_setup import prepare_for_training

    device = pick_device()
    tokenizer = load_tokenizer(model_dir)
    rows = Dataset.from_list(long_rows(steps * batch + 4, 8 * seq, variable=case.variable_lengths))
    if case.recipe == "trl_docs":
        return trl_docs_trainer(case, model_dir, tokenizer, rows, seq, batch, rank, steps, work, device)
    cfg = case_config(case, seq, batch, rank, steps)
    model = load_causal_lm(model_dir, bnb_config_for(case.quant), device)
    model = prepare_for_training(model, cfg, quantized=case.quant is not None, keep_embeddings_bf16=case.embeddings_bf16)
    loss_func = None if case.fused_loss else full_logits_loss(model.config.get_text_config().vocab_size)
    # padding-free without packing flattens the batch into one row; TRL then wants max_length None (the
    # mixed-length rows are all shorter than seq)
    return build_project_trainer(model, tokenizer, cfg, rows, None, work / "trainer", device, compute_loss_func=loss_func,
                                 save_strategy="no", padding_free=case.padding_free, use_liger_kernel=case.liger,
                                 max_length=None if case.padding_free else seq)

def trl_docs_trainer(case: Case, model_dir: str, tokenizer, rows, seq: int, batch: int, rank: int, steps: int,
                     work: Path, device: str):
    """QLoRA exactly as TRL's docs show it: plain from_pretrained, all-linear LoRA handed to SFTTrainer,
    peft's preparation left to the trainer."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config_for(case.quant),
                                                 dtype=torch.bfloat16, device_map={"": device})
    lora = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules="all-linear")
    args = SFTConfig(output_dir=str(work / "trainer"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     max_steps=steps, max_length=seq, learning_rate=2e-4, optim=case.optim, bf16=True,
                     gradient_checkpointing=case.gradient_checkpointing, logging_steps=1000, save_strategy="no",
                     report_to=[], use_cpu=device == "cpu")
    return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)

def batch_tokens(trainer, steps: int) -> tuple[list[int], list[int]]:
    """Non-padding tokens, and token slots (padding included), of the first `steps` batches the trainer
    will see (we read the batches the dataloader produces)."""
    counts, slots = [], []
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= steps:
            break
        slots.append(int(batch["input_ids"].numel()))
        counts.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else slots[-1])
    return counts, slots

def measure_training(case: Case, model_dir: str, seq: int, batch: int, rank: int, steps: int, warmup: int,
                     work: Path) -> dict:
    import torch

    from memory_usage import count_parameters, peak_memory_report, weight_footprint

    trainer = build_trainer(case, model_dir, seq, batch, rank, steps + warmup, work)
    footprint = weight_footprint(trainer.model)
    trainable, total = count_parameters(trainer.model)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad})
    embed_dtype = str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    tokens, slots = batch_tokens(trainer, steps + warmup)
    rss_before_train = proc_status_gib("VmRSS")
    file_rss_before_train = proc_status_gib("RssFile")  # pages of mapped files (the checkpoint, when still mapped)
    load_peak = peak_memory_report()
    reset = reset_peak_rss()  # VmHWM then measures the training phase alone
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    train_phase_rss = proc_status_gib("VmHWM") if reset else None
    peak = peak_memory_report()  # the training phase's (VmHWM was reset): the whole-process peak is the larger phase
    peak["peak_rss_gib"] = max(peak["peak_rss_gib"], load_peak["peak_rss_gib"])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = timer.wall[warmup:], timer.cpu[warmup:]
    step_s, step_cpu_s = sum(wall) / len(wall), sum(cpu) / len(cpu)
    tok = sum(tokens[warmup:]) / len(wall)
    return {"step_s": step_s, "step_cpu_s": step_cpu_s, "tokens_per_s": tok / step_s, "tokens_per_cpu_s": tok / step_cpu_s,
            "tokens_per_step": tok, "max_batch_slots": max(slots), "step_wall_times": timer.wall, "step_cpu_times": timer.cpu,
            "trainable_params": trainable, "total_params": total, "trainable_dtypes": dtypes,
            "embedding_dtype": embed_dtype, "optim": getattr(trainer.args.optim, "value", str(trainer.args.optim)), "weights_gib": footprint["total_bytes"] / 1024**3,
            "rss_before_train_gib": rss_before_train, "file_rss_before_train_gib": file_rss_before_train,
            "file_rss_after_train_gib": proc_status_gib("RssFile"), "train_phase_peak_rss_gib": train_phase_rss, "peak_before_train": load_peak, "peak": peak}

def measure_tokenize(model_dir: str, seq: int, rank: int, work: Path) -> dict:
    """Peak RSS while SFTTrainer prepares a dataset holding one very long row, per token of that row."""
    from datasets import Dataset

    from config_utils import training_defaults
    from memory_planner import tokens_of_row
    from model_loading import load_causal_lm, load_tokenizer
    from training_setup import build_trainer, prepare_for_training

    tokenizer = load_tokenizer(model_dir)
    rows = long_rows(8, 8 * seq)
    rows[0] = long_rows(1, LONG_ROW_CHARS)[0]
    tokens = tokens_of_row(tokenizer, rows[0])
    cfg = {**training_defaults(), "lora_r": rank, "max_seq_length": seq, "max_steps": 1}
    model = prepare_for_training(load_causal_lm(model_dir, None, "cpu"), cfg, quantized=False)
    before = proc_status_gib("VmRSS")
    reset_peak_rss()
    build_trainer(model, tokenizer, cfg, Dataset.from_list(rows), None, work, "cpu", save_strategy="no")
    peak = proc_status_gib("VmHWM")
    return {"longest_row_tokens": tokens, "longest_row_chars": len(rows[0]["completion"][0]["content"]),
            "rss_before_gib": before, "tokenize_peak_gib": peak,
            "bytes_per_token": round((peak - before) * 1024**3 / tokens, 1),
            "peak": {"device": "cpu", "peak_rss_gib": peak - before}}

def run_worker(args) -> None:
    case = CASES_BY_NAME[args.worker]
    batch = case.batch or args.batch
    if case.kind == "weights":
        result = measure_weights(case, args.model_dir)
    elif case.kind == "tokenize":
        result = measure_tokenize(args.model_dir, args.seq, args.rank, Path(args.work_dir) / case.name)
    else:
        result = measure_training(case, args.model_dir, args.seq, batch, args.rank, args.steps, args.warmup,
                                  Path(args.work_dir) / case.name)
    result.update(case=asdict(case), batch=batch, seq=args.seq, rank=args.rank)
    print("RESULT " + json.dumps(result))

# ----- parent: build the model, run every case in its own process, tabulate ----------------------------------

def benchmark_architecture(arch: str, layers: int | None = None) -> dict:
    """The config.json the benchmark builds: a shipped architecture, with `layers` decoder layers when given
    (widths, vocabulary, tying and dtypes stay the published ones)."""
    from model_fixtures import architecture

    config = architecture(arch)
    if layers is not None:
        config["num_hidden_layers"] = layers
        config.pop("layer_types", None)  # one entry per layer: the model rebuilds it from its pattern
    return config

def build_model(config: dict, model_dir: Path) -> None:
    """A random-weight model of `config` (bf16 safetensors) with the project's small BPE tokenizer."""
    from model_fixtures import build_random_model, model_dimensions, train_bpe_tokenizer
    from tools.make_tiny_model import tokenizer_corpus

    dimensions = model_dimensions(config)
    if (model_dir / "config.json").exists():
        saved = json.loads((model_dir / "config.json").read_text())
        if saved.get("model_type") == config["model_type"] and all(
                saved.get(k) == v for k, v in dimensions.items() if not isinstance(v, dict)):
            return
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), 512)
    build_random_model(model_dir, tokenizer, config["model_type"], **dimensions)

def skip_reason(case: Case) -> str | None:
    import torch

    if case.liger and not torch.cuda.is_available():
        return "Liger kernels need CUDA"
    if case.liger:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
    return None

def run_case(case: Case, args, model_dir: Path) -> dict:
    reason = skip_reason(case)
    if reason:
        return {"case": asdict(case), "skipped": reason}
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={case.name}", f"--model-dir={model_dir}",
           f"--seq={args.seq}", f"--batch={args.batch}", f"--rank={args.rank}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--work-dir={args.work_dir}"]
    started = time.time()
    log_path = Path(args.work_dir) / f"{case.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (log_path.read_text().strip().splitlines() or ["no output"])[-1]
        return {"case": asdict(case), "failed": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.time() - started
    return result

def peak_gib(result: dict) -> float:
    peak = result["peak"]
    return peak["overall_max_allocated_gib"] if peak["device"] == "cuda" else peak["peak_rss_gib"]

# ----- tables: the planner beside each measurement, ratios within the run, larger architectures -----------

def setup_for(case: dict, result: dict, device: str):
    """The planner's view of a training case."""
    from memory_planner import TrainingSetup

    method = "full" if case["peft"] == "full" else ("qlora" if case["quant"] else "lora")
    trl_docs = case["recipe"] == "trl_docs"
    # mixed lengths: the largest batch the data gives, in token slots (padding included), read from the
    # dataloader before training; fixed lengths: batch x seq
    seq, batch = (result["max_batch_slots"], 1) if case["variable_lengths"] else (result["seq"], result["batch"])
    return TrainingSetup(
        method=method, lora_r=result["rank"], seq_len=seq, batch_size=batch,
        gradient_checkpointing=case["gradient_checkpointing"], fused_loss=case["fused_loss"],
        quant=case["quant"] or "nf4_dq", embeddings_dtype="bf16" if trl_docs or case["embeddings_bf16"] else "fp32",
        norms_dtype="bf16" if trl_docs or case["embeddings_bf16"] else "fp32", device=device,
        # runs saved before the optimizer was recorded trained with paged_adamw_32bit, the default then
        optim=case.get("optim") or result.get("optim", "paged_adamw_32bit"), checkpoint_mapped=trl_docs)

def annotate(report: dict) -> dict:
    """Add to each result: planned peak and the planner's error, peak vs the TRL-docs baseline, step time
    vs bf16 LoRA. Ratios only between results of this one report."""
    from memory_planner import TOKENIZE_BYTES_PER_TOKEN, plan_load_memory, plan_training_memory

    cfg = benchmark_architecture(report["arch"], report.get("layers"))
    rows = {r["case"]["name"]: r for r in report["results"] if "peak" in r}
    base, lora = rows.get("trl_docs_qlora"), rows.get("lora_bf16")
    for row in rows.values():
        row["peak_gb_measured"] = peak_gib(row)
    for row in rows.values():
        if row["case"]["kind"] == "tokenize":  # the tokenization's own share of the peak: bytes per token
            planned = TOKENIZE_BYTES_PER_TOKEN * row["longest_row_tokens"] / 1024**3
            row["plan"] = {"peak_gib": round(planned, 3)}
            row["planner_error"] = round((planned - row["peak_gb_measured"]) / row["peak_gb_measured"], 4)
            continue
        if row["case"]["kind"] != "train":
            row["plan"] = plan_load_memory(cfg, row["case"]["quant"], row["peak"]["device"])
            row["planner_error"] = round((row["plan"]["peak_gib"] - row["peak_gb_measured"]) / row["peak_gb_measured"], 4)
            continue
        plan = plan_training_memory(cfg, setup_for(row["case"], row, row["peak"]["device"]))
        row["plan"] = plan
        row["planner_error"] = round((plan["peak_gib"] - row["peak_gb_measured"]) / row["peak_gb_measured"], 4)
        if base:
            row["peak_ratio_vs_trl_docs"] = round(row["peak_gb_measured"] / base["peak_gb_measured"], 3)
        if lora:
            key = "step_cpu_s" if row["peak"]["device"] == "cpu" else "step_s"
            row["step_ratio_vs_lora_bf16"] = round(row[key] / lora[key], 3)
    return report

def _fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)

def _phase(row: dict) -> str:
    """Training-phase peak RSS (after a reset of the high-water mark at the start of training) / planned."""
    measured, plan = row.get("train_phase_peak_rss_gib"), row.get("plan", {})
    if measured is None or "train_peak_bytes" not in plan:
        return ""
    from memory_usage import GIB

    return f"{measured:.3f} / {plan['train_peak_bytes'] / GIB:.3f}"

def render_table(report: dict) -> str:
    device = next((r["peak"]["device"] for r in report["results"] if "peak" in r), "cpu")
    measure = "peak RSS GiB" if device == "cpu" else "max allocated GiB"
    layers = f", {report['layers']} layers" if report.get("layers") else ""
    lines = [f"{report['arch']} (random weights{layers}), seq {report['seq']}, LoRA r={report['rank']}, batch {report['batch']}, "
             f"{report['steps']} measured steps after {report['warmup']} warm-up, device {device}",
             "",
             f"| case | what | weights GiB | bits/quantized param | {measure} | planned GiB | planner error | "
             "peak vs TRL docs | training-phase RSS GiB (measured / planned) | step s (wall) | step CPU s | tokens/s "
             "| step vs LoRA bf16 |",
             "|" + "---|" * 13]
    for row in report["results"]:
        case = row["case"]
        if "peak" not in row:
            lines.append(f"| {case['name']} | {case['note']} | {row.get('skipped') or row.get('failed')} |" + " |" * 10)
            continue
        error = row.get("planner_error")
        lines.append("| " + " | ".join([
            case["name"], case["note"], _fmt(row.get("weights_gib")), _fmt(row.get("bits_per_quantized_param"), ".4f"),
            _fmt(row["peak_gb_measured"]), _fmt(row.get("plan", {}).get("peak_gib")),
            "" if error is None else f"{100 * error:+.1f}%", _fmt(row.get("peak_ratio_vs_trl_docs"), ".2f"),
            _phase(row),
            _fmt(row.get("step_s"), ".1f"), _fmt(row.get("step_cpu_s"), ".1f"), _fmt(row.get("tokens_per_s"), ".1f"),
            _fmt(row.get("step_ratio_vs_lora_bf16"), ".2f")]) + " |")
    return "\n".join(lines)

def render_extrapolation(report: dict, archs=("Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")) -> str:
    """Larger architectures, EXTRAPOLATED (not measured): weights from the measured bytes per parameter of
    each format, training peaks from the planner scaled by its measured/planned ratio on this run's model."""
    from memory_planner import parameter_counts, plan_training_memory
    from memory_usage import GIB
    from model_fixtures import architecture_dimensions

    rows = {r["case"]["name"]: r for r in report["results"] if "peak" in r}
    measured_arch = parameter_counts(architecture_dimensions(report["arch"]))
    lines = [f"EXTRAPOLATED from the {report['arch']} measurements above (not measured):", "",
             "| architecture | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for arch in archs:
        counts = parameter_counts(architecture_dimensions(arch))
        cells = []
        for name, row in rows.items():
            if row["case"]["kind"] == "weights":
                bits = row.get("bits_per_quantized_param", 16.0)
                plain = row["weights_gib"] * GIB - measured_arch["linear"] * bits / 8
                per_plain = plain / (measured_arch["embedding"] + measured_arch["lm_head"] + measured_arch["norms"])
                total = counts["linear"] * bits / 8 + per_plain * (counts["embedding"] + counts["lm_head"] + counts["norms"])
                cells.append(f"{total / GIB:.2f}")
            elif "plan" in row:
                scale = row["peak_gb_measured"] / row["plan"]["peak_gib"]
                plan = plan_training_memory(architecture_dimensions(arch), setup_for(row["case"], row, row["peak"]["device"]))
                cells.append(f"{plan['peak_gib'] * scale:.2f}")
            else:
                cells.append("")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def main(argv=None) -> dict:
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
    parser.add_argument("--cases", default="all", help="comma-separated case names, or all: " + ", ".join(CASES_BY_NAME))
    parser.add_argument("--work-dir", default="/tmp/qlora-benchmark", help="where the random model and scratch go")
    parser.add_argument("--out", default=None, help="write every result (JSON) here")
    parser.add_argument("--from-json", default=None,
                        help="only print the tables of earlier runs' --out files (comma-separated: results merged)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    if args.from_json:
        reports = [json.loads(Path(path).read_text()) for path in args.from_json.split(",")]
        report = annotate({**reports[0], "results": [r for rep in reports for r in rep["results"]]})
        print(render_table(report) + "\n\n" + render_extrapolation(report))
        return report
    names = list(CASES_BY_NAME) if args.cases == "all" else [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES_BY_NAME]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; allowed: {', '.join(CASES_BY_NAME)}")
    for name in ("seq", "batch", "rank", "steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    model_dir = Path(args.work_dir) / (args.arch + (f"-{args.layers}layers" if args.layers else ""))
    build_model(benchmark_architecture(args.arch, args.layers), model_dir)
    header = {"arch": args.arch, "layers": args.layers, "seq": args.seq, "batch": args.batch, "rank": args.rank, "steps": args.steps,
              "warmup": args.warmup}
    results = []
    for name in names:
        result = run_case(CASES_BY_NAME[name], args, model_dir)
        results.append(result)
        if args.out:  # after every case, so an interrupted run keeps what it measured
            Path(args.out).write_text(json.dumps({**header, "results": results}, indent=2))
        print(json.dumps({"case": name, **{k: v for k, v in result.items() if k not in ("case", "footprint")}}),
              flush=True)
    report = {**header, "results": results}
    report = annotate(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(render_table(report) + "\n\n" + render_extrapolation(report))
    return report

if __name__ == "__main__":
    main()
