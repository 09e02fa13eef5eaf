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
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

@dataclass(frozen=True)
class Case:
    """One configuration the benchmark runs in its own process."""

    name: str
    kind: str  # weights | train
    quant: str | None = None  # None (bf16) | nf4 | nf4_dq | fp4
    peft: str = "lora"  # lora | full
    full_weights_dtype: str = "bf16"  # full only: bf16 | fp32 (01_Train.py's full_weights_dtype)
    recipe: str = "project"  # project (01_Train.py's path) | trl_docs (the recipe TRL's docs show) | unsloth
    gradient_checkpointing: bool = True
    fused_loss: bool = True  # TRL's chunked LM head + loss; False = full logits through a compute_loss_func
    embeddings_bf16: bool = True  # project QLoRA: keep the frozen embedding/head bf16 after kbit prep
    padding_free: bool = False  # TRL's padding_free without packing: a step's rows flattened into one
    packing: bool = False  # 01_Train.py's `packing`: rows packed padding-free into rows of --seq tokens
    variable_lengths: bool = False  # rows of mixed length (for the padding-free lever)
    liger: bool = False  # CUDA only
    activation_offloading: bool = False  # TRL's: saved activations go to CPU memory (CUDA only)
    batch: int | None = None  # None = the run's --batch
    accumulation: int = 1  # gradient accumulation steps: micro-batches per (measured) optimizer step
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
    Case("full_fp32", "train", None, peft="full", full_weights_dtype="fp32",
         note="full fine-tuning, fp32 master weights, bf16 compute"),
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
    Case("qlora_packed", "train", "nf4_dq", variable_lengths=True, packing=True,
         note="lever: mixed lengths packed padding-free into rows of seq tokens"),
    Case("qlora_offload", "train", "nf4_dq", activation_offloading=True,
         note="lever: TRL activation offloading (CUDA only)"),
    Case("qlora_b1_ga4", "train", "nf4_dq", batch=1, accumulation=4, note="lever: batch 1 x accumulation 4"),
    Case("qlora_b4_ga1", "train", "nf4_dq", batch=4, note="lever: batch 4 x accumulation 1 (same effective batch)"),
    Case("unsloth_qlora", "train", "nf4_dq", recipe="unsloth", note="anchor: unsloth (own environment, CUDA only)"),
    Case("tokenize_long_row", "tokenize", None,
         note="TRL's dataset preparation of one row of 2,000,000 characters (before truncation)"),
]
LONG_ROW_CHARS = 2_000_000
CASES_BY_NAME = {case.name: case for case in CASES}
# The throughput comparison (gpu/throughput_check.sh): the recipe, the project's default, each speed lever, unsloth.
# Most telling first: a run cut short by its time limit keeps the goal's three cases.
THROUGHPUT_CASES = ("trl_docs_qlora", "qlora", "unsloth_qlora", "qlora_b4_ga1", "qlora_b1_ga4", "qlora_packed",
                    "qlora_b4_padded", "qlora_b4_padding_free", "qlora_liger", "qlora_offload")
CASE_GROUPS = {"all": tuple(CASES_BY_NAME), "throughput": THROUGHPUT_CASES}

# ----- data ---------------------------------------------------------------------------------------------

def long_rows(count: int, min_chars: int, seed: int = 0, variable: bool = False) -> list[dict]:
    """Prompt/completion rows whose completion is at least `min_chars` long, built from the project's
    generated openmath rows. With `variable`, completions of 1/64 to 1/3 of `min_chars` (for the
    benchmark's 8 * seq, about 80 to 500 tokens with its tokenizer: under seq, so nothing is truncated)."""
    import random

    from qlora.data.synthetic import generate_rows

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
    from qlora.core.memory import GIB, proc_status_bytes

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

    from qlora.core.memory import peak_memory_report, weight_footprint
    from qlora.model.loading import load_causal_lm, pick_device

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
    """Per optimizer step: wall seconds and this process's CPU seconds (all threads), each from the end of
    the step before (the first from its own start), so that fetching and collating the step's batches, the
    optimizer and logging all count. On a shared CPU machine the CPU seconds are the fair measure of work;
    on CUDA the wall time is."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self._last = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self._last is None:
                synchronize()
                self._last = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            now = (time.perf_counter(), time.process_time())
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
            self._last = now
            print(f"step {len(self.wall)}: {self.wall[-1]:.2f}s wall, {self.cpu[-1]:.2f}s cpu", file=sys.stderr, flush=True)

    return StepTimer()

def case_config(case: Case, seq: int, batch: int, rank: int, steps: int) -> dict:
    """01_Train.py's constants as the script has them, with this case's levers and sizes applied."""
    from qlora.config import training_defaults

    cfg = training_defaults()
    cfg.update(lora_r=rank, max_seq_length=seq, per_device_train_batch_size=batch,
               gradient_accumulation_steps=case.accumulation, packing=case.packing, max_steps=steps,
               gradient_checkpointing=case.gradient_checkpointing, logging_steps=1,
               QUANT_METHOD="QLORA" if case.quant else "NONE", PEFT_CONFIG="Full" if case.peft == "full" else "LoRa",
               full_weights_dtype=case.full_weights_dtype)
    if case.optim is not None:
        cfg["optim"] = case.optim
    return cfg

def row_count(case: Case, steps: int, batch: int) -> int:
    """Rows enough for `steps` optimizer steps (packing fits several mixed-length rows into each packed row)."""
    return (steps * batch * case.accumulation + 4) * (8 if case.packing else 1)

def build_trainer(case: Case, model_dir: str, seq: int, batch: int, rank: int, steps: int, work: Path):
    """The model and SFTTrainer of one training case: built by training_setup exactly as 01_Train.py builds
    them, by TRL's documented recipe (the baseline), or by unsloth's (the outside anchor)."""
    from datasets import Dataset

    rows = Dataset.from_list(long_rows(row_count(case, steps, batch), 8 * seq, variable=case.variable_lengths))
    if case.recipe == "unsloth":
        return unsloth_trainer(case, model_dir, rows, seq, batch, rank, steps, work)

    from qlora.model.loading import load_causal_lm, load_tokenizer, pick_device
    from qlora.train.trainer import build_trainer as build_project_trainer
    from qlora.train.peft import prepare_for_training, weights_dtype

    device = pick_device()
    tokenizer = load_tokenizer(model_dir)
    if case.recipe == "trl_docs":
        return trl_docs_trainer(case, model_dir, tokenizer, rows, seq, batch, rank, steps, work, device)
    cfg = case_config(case, seq, batch, rank, steps)
    model = load_causal_lm(model_dir, bnb_config_for(case.quant), device, dtype=weights_dtype(cfg))
    model = prepare_for_training(model, cfg, quantized=case.quant is not None, keep_embeddings_bf16=case.embeddings_bf16)
    loss_func = None if case.fused_loss else full_logits_loss(model.config.get_text_config().vocab_size)
    levers = {"use_liger_kernel": case.liger, "activation_offloading": case.activation_offloading}
    if case.padding_free:
        # padding-free without packing flattens the batch into one row; TRL then wants max_length None (the
        # mixed-length rows are all shorter than seq)
        levers.update(padding_free=True, max_length=None)
    return build_project_trainer(model, tokenizer, cfg, rows, None, work / "trainer", device, compute_loss_func=loss_func,
                                 save_strategy="no", **levers)

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
    args = SFTConfig(output_dir=str(work / "trainer"), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=case.accumulation, max_steps=steps, max_length=seq, learning_rate=2e-4,
                     optim=case.optim, bf16=True, gradient_checkpointing=case.gradient_checkpointing, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=device == "cpu")
    return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)

def unsloth_trainer(case: Case, model_dir: str, rows, seq: int, batch: int, rank: int, steps: int, work: Path):
    """QLoRA as unsloth's docs show it (its 4-bit loader, its LoRA with dropout 0 and its gradient
    checkpointing, TRL's SFTTrainer patched by unsloth), on the same rows, rank, alpha, targets and
    optimizer as the project's case. Runs under unsloth's own package versions (--unsloth-site)."""
    from unsloth import FastLanguageModel  # before trl: unsloth patches it on import
    from trl import SFTConfig, SFTTrainer

    from qlora.config import training_defaults

    defaults = training_defaults()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=seq, load_in_4bit=True,
                                                         dtype=None)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=defaults["lora_alpha"], lora_dropout=0,
                                             target_modules=list(defaults["target_modules"]), bias="none",
                                             use_gradient_checkpointing="unsloth" if case.gradient_checkpointing else False,
                                             random_state=defaults["seed"])
    args = SFTConfig(output_dir=str(work / "trainer"), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=case.accumulation, max_steps=steps, max_length=seq,
                     learning_rate=defaults["learning_rate"], optim=defaults["optim"], bf16=True, logging_steps=1,
                     save_strategy="no", report_to=[], seed=defaults["seed"])
    return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)

def row_lengths(batch) -> list[int]:
    """Tokens of each row of a collated batch: padding-free and packed batches carry their row boundaries
    (cu_seq_lens_q), padded ones an attention mask."""
    if "cu_seq_lens_q" in batch:
        return [int(n) for n in batch["cu_seq_lens_q"].diff()]
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1) if n > 0]
    return [int(batch["input_ids"].shape[1])] * int(batch["input_ids"].shape[0])

def step_rows(trainer, steps: int) -> tuple[list[list[int]], list[int]]:
    """Row lengths (padding excluded) of each of the first `steps` optimizer steps, and the largest micro-batch
    in token slots (padding included): we read the batches the dataloader produces, gradient_accumulation_steps
    micro-batches to a step."""
    accumulation = trainer.args.gradient_accumulation_steps
    rows, slots = [[] for _ in range(steps)], []
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= steps * accumulation:
            break
        rows[i // accumulation] += row_lengths(batch)
        slots.append(int(batch["input_ids"].numel()))
    return rows, slots

def device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

def speed_report(case: Case, model_dir: str, rows: list[list[int]], wall: list[float], rank: int) -> dict:
    """Model FLOPs of each measured step (throughput.training_flops) and the utilization they give."""
    from qlora.planner.throughput import model_flops_utilization, training_flops
    from qlora.train.peft import DEFAULT_TARGET_MODULES

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    flops = [training_flops(cfg, step, None if case.peft == "full" else rank, DEFAULT_TARGET_MODULES,
                            case.gradient_checkpointing, full=case.peft == "full").total for step in rows]
    per_s = sum(flops) / sum(wall)
    return {"step_flops": flops, "model_tflops_per_s": per_s / 1e12, "device_name": device_name(),
            "mfu": model_flops_utilization(sum(flops), sum(wall), device_name())}

def measure_training(case: Case, model_dir: str, seq: int, batch: int, rank: int, steps: int, warmup: int,
                     work: Path) -> dict:
    from qlora.core.memory import count_parameters, peak_memory_report, weight_footprint

    trainer = build_trainer(case, model_dir, seq, batch, rank, steps + warmup, work)
    footprint = weight_footprint(trainer.model)
    trainable, total = count_parameters(trainer.model)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad})
    embed_dtype = str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    rows, slots = step_rows(trainer, steps + warmup)
    rss_before_train = proc_status_gib("VmRSS")
    file_rss_before_train = proc_status_gib("RssFile")  # pages of mapped files (the checkpoint, when still mapped)
    load_peak = peak_memory_report()
    reset = reset_peak_rss()  # VmHWM then measures the training phase alone
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    synchronize()
    train_phase_rss = proc_status_gib("VmHWM") if reset else None
    peak = peak_memory_report()  # the training phase's (VmHWM was reset): the whole-process peak is the larger phase
    peak["peak_rss_gib"] = max(peak["peak_rss_gib"], load_peak["peak_rss_gib"])
    wall, cpu, measured = timer.wall[warmup:], timer.cpu[warmup:], rows[warmup:len(timer.wall)]
    step_s, step_cpu_s = sum(wall) / len(wall), sum(cpu) / len(cpu)
    tok = sum(sum(step) for step in measured) / len(wall)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"step_s": step_s, "step_cpu_s": step_cpu_s, "tokens_per_s": tok / step_s, "tokens_per_cpu_s": tok / step_cpu_s,
            "tokens_per_step": tok, "max_batch_slots": max(slots), "step_wall_times": timer.wall, "step_cpu_times": timer.cpu,
            "step_rows": rows, "losses": losses, "final_loss": losses[-1] if losses else None,
            **speed_report(case, model_dir, measured, wall, rank),
            "trainable_params": trainable, "total_params": total, "trainable_dtypes": dtypes,
            "embedding_dtype": embed_dtype, "optim": getattr(trainer.args.optim, "value", str(trainer.args.optim)), "weights_gib": footprint["total_bytes"] / 1024**3,
            "rss_before_train_gib": rss_before_train, "file_rss_before_train_gib": file_rss_before_train,
            "file_rss_after_train_gib": proc_status_gib("RssFile"), "train_phase_peak_rss_gib": train_phase_rss, "peak_before_train": load_peak, "peak": peak}

def measure_tokenize(model_dir: str, seq: int, rank: int, work: Path) -> dict:
    """Peak RSS while SFTTrainer prepares a dataset holding one very long row, over the same trainer built on
    the other rows just before, per token of that row."""
    from datasets import Dataset

    from qlora.config import training_defaults
    from qlora.planner.memory import tokens_of_row
    from qlora.model.loading import load_causal_lm, load_tokenizer
    from qlora.train.trainer import build_trainer
    from qlora.train.peft import prepare_for_training

    tokenizer = load_tokenizer(model_dir)
    rows = long_rows(8, 8 * seq)
    rows[0] = long_rows(1, LONG_ROW_CHARS)[0]
    tokens = tokens_of_row(tokenizer, rows[0])
    cfg = {**training_defaults(), "lora_r": rank, "max_seq_length": seq, "max_steps": 1}
    model = prepare_for_training(load_causal_lm(model_dir, None, "cpu"), cfg, quantized=False)
    # the same trainer on the ordinary rows first: what building a trainer costs (mapped weights read, ...)
    build_trainer(model, tokenizer, cfg, Dataset.from_list(rows[1:]), None, work / "short", "cpu", save_strategy="no")
    before = proc_status_gib("VmRSS")
    reset_peak_rss()
    build_trainer(model, tokenizer, cfg, Dataset.from_list(rows), None, work / "long", "cpu", save_strategy="no")
    peak = proc_status_gib("VmHWM")
    return {"longest_row_tokens": tokens, "longest_row_chars": len(rows[0]["completion"][0]["content"]),
            "rss_before_gib": before, "tokenize_peak_gib": peak,
            "bytes_per_token": round((peak - before) * 1024**3 / tokens, 1),
            "peak": {"device": "cpu", "peak_rss_gib": peak - before}}

def run_worker(args) -> None:
    case = CASES_BY_NAME[args.worker]
    if case.recipe == "unsloth":
        import unsloth  # noqa: F401  first: it patches transformers, peft and trl as they import
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
    from qlora.model.fixtures import architecture

    config = architecture(arch)
    if layers is not None:
        config["num_hidden_layers"] = layers
        config.pop("layer_types", None)  # one entry per layer: the model rebuilds it from its pattern
    return config

def build_model(config: dict, model_dir: Path) -> None:
    """A random-weight model of `config` (bf16 safetensors) with the project's small BPE tokenizer."""
    from qlora.model.fixtures import build_random_model, model_dimensions, train_bpe_tokenizer
    from tools.make_tiny_model import tokenizer_corpus

    dimensions = model_dimensions(config)
    if (model_dir / "config.json").exists():
        saved = json.loads((model_dir / "config.json").read_text())
        if saved.get("model_type") == config["model_type"] and all(
                saved.get(k) == v for k, v in dimensions.items() if not isinstance(v, dict)):
            return
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), 512)
    build_random_model(model_dir, tokenizer, config["model_type"], **dimensions)

def unsloth_installed(site: str | None) -> bool:
    return bool(site) and (Path(site) / "unsloth" / "__init__.py").is_file()

def skip_reason(case: Case, unsloth_site: str | None = None) -> str | None:
    """Why a case cannot run here (None: it can): what it needs, checked before a worker starts."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    unsloth = case.recipe == "unsloth"
    needs = [
        (case.liger and not cuda, "Liger kernels need CUDA"),
        (case.liger and importlib.util.find_spec("liger_kernel") is None, "liger-kernel is not installed"),
        (case.activation_offloading and not cuda,
         "activation offloading moves CUDA activations to CPU memory: needs CUDA"),
        (unsloth and not cuda, "unsloth's kernels need CUDA (without it unsloth trains through stock transformers)"),
        (unsloth and not unsloth_installed(unsloth_site),
         "unsloth is not installed: give --unsloth-site (gpu/throughput_check.sh installs it from .whl/unsloth)"),
    ]
    return next((reason for applies, reason in needs if applies), None)

def worker_env(case: Case, unsloth_site: str | None, work_dir: Path) -> dict:
    """A worker's environment: unsloth's case sees its own packages (--unsloth-site) instead of the project's
    extra ones (PYTHONPATH), and compiles its kernels into the work directory."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if case.recipe == "unsloth":
        env.update(PYTHONPATH=str(Path(unsloth_site).resolve()), HF_HUB_OFFLINE="1",
                   UNSLOTH_COMPILE_LOCATION=str(work_dir.resolve() / "unsloth_compiled_cache"))
    return env

def run_case(case: Case, args, model_dir: Path) -> dict:
    reason = skip_reason(case, args.unsloth_site)
    if reason:
        return {"case": asdict(case), "skipped": reason}
    work_dir = Path(args.work_dir)
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={case.name}", f"--model-dir={model_dir.resolve()}",
           f"--seq={args.seq}", f"--batch={args.batch}", f"--rank={args.rank}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--work-dir={work_dir.resolve()}"]
    started = time.time()
    log_path = work_dir / f"{case.name}.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=args.case_timeout,
                                  env=worker_env(case, args.unsloth_site, work_dir))
        except subprocess.TimeoutExpired:
            return {"case": asdict(case), "failed": f"timed out after {args.case_timeout} s (log: {log_path})"}
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
    from qlora.planner.memory import TrainingSetup

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
        # runs saved before the optimizer was recorded used paged_adamw_32bit, the default then
        optim=case.get("optim") or result.get("optim") or "paged_adamw_32bit", checkpoint_mapped=trl_docs,
        full_weights_dtype=case.get("full_weights_dtype", "bf16"))  # saved before the case had it: bf16

def report_model_config(report: dict) -> dict:
    """The measured model's config: saved in the report (a --model run), else the architecture it was built as."""
    return report.get("model_config") or benchmark_architecture(report["arch"], report.get("layers"))

def annotate(report: dict) -> dict:
    """Add to each result: planned peak and the planner's error, peak vs the TRL-docs baseline, step time
    vs bf16 LoRA. Ratios only between results of this one report."""
    from qlora.planner.memory import TOKENIZE_BYTES_PER_TOKEN, plan_load_memory, plan_training_memory

    cfg = report_model_config(report)
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
    from qlora.core.memory import GIB

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

def _ratio(row: dict | None, base: dict | None, key: str) -> float | None:
    if not row or not base or row.get(key) is None or not base.get(key):
        return None
    return row[key] / base[key]

def throughput_goals(report: dict) -> list[str]:
    """The project's default (case qlora) against the TRL-docs recipe and against unsloth, as measured in this
    report: goals >= 1.5x the recipe's tokens/s at no more memory, and within 1.25x of unsloth's tokens/s."""
    rows = {r["case"]["name"]: r for r in report["results"] if "peak" in r}
    project, recipe, unsloth = rows.get("qlora"), rows.get("trl_docs_qlora"), rows.get("unsloth_qlora")
    memory = "overall_max_allocated_gib" if project and project["peak"]["device"] == "cuda" else "peak_rss_gib"
    speed = _ratio(project, recipe, "tokens_per_s")
    mem = _ratio(project and project["peak"], recipe and recipe["peak"], memory)
    behind = _ratio(unsloth, project, "tokens_per_s")
    text = lambda value: "n/a" if value is None else f"{value:.2f}x"  # noqa: E731
    return [f"project default (qlora) vs TRL docs recipe: {text(speed)} tokens/s (goal >= 1.50x), "
            f"{text(mem)} {memory} (goal <= 1.00x)",
            f"unsloth vs project default: {text(behind)} tokens/s (goal <= 1.25x)"]

def render_throughput(report: dict) -> str:
    """Speed of every training case: tokens/s, model FLOPs and their utilization of the GPU's bf16 peak,
    memory, and the training loss at the last step."""
    rows = [r for r in report["results"] if r["case"]["kind"] == "train"]
    device = next((r["peak"]["device"] for r in rows if "peak" in r), "cpu")
    name = next((r.get("device_name") for r in rows if r.get("device_name")), None) or "CPU"
    memory = ("max allocated GiB | max reserved GiB" if device == "cuda" else "peak RSS GiB | (CPU: no reserved)")
    base = next((r for r in rows if r["case"]["name"] == "trl_docs_qlora" and "peak" in r), None)
    lines = [f"Throughput on {name}: {report['arch']}, seq {report['seq']}, LoRA r={report['rank']}, "
             f"{report['steps']} measured optimizer steps after {report['warmup']} warm-up",
             "",
             f"| case | what | batch x accum. | tokens/step | step s | tokens/s | vs TRL docs | model TFLOP/s | MFU "
             f"| {memory} | loss at last step |",
             "|" + "---|" * 12]
    for row in rows:
        case = row["case"]
        if "peak" not in row:
            lines.append(f"| {case['name']} | {case['note']} | {row.get('skipped') or row.get('failed')} |" + " |" * 9)
            continue
        peak = row["peak"]
        allocated, reserved = ((peak["overall_max_allocated_gib"], peak["overall_max_reserved_gib"])
                               if device == "cuda" else (peak["peak_rss_gib"], None))
        mfu = row.get("mfu")
        lines.append("| " + " | ".join([
            case["name"], case["note"], f"{row['batch']} x {case.get('accumulation', 1)}", _fmt(row["tokens_per_step"], ".0f"),
            _fmt(row["step_s"], ".3f"), _fmt(row["tokens_per_s"], ".0f"), _fmt(_ratio(row, base, "tokens_per_s"), ".2f"),
            _fmt(row.get("model_tflops_per_s"), ".3g"), "n/a" if mfu is None else f"{100 * mfu:.1f}%",
            _fmt(allocated), _fmt(reserved), _fmt(row.get("final_loss"), ".4f")]) + " |")
    return "\n".join(lines + [""] + throughput_goals(report))

def render_extrapolation(report: dict, archs=("Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")) -> str:
    """Larger architectures, EXTRAPOLATED (not measured): weights from the measured bytes per parameter of
    each format, training peaks from the planner scaled by its measured/planned ratio on this run's model."""
    from qlora.planner.memory import parameter_counts, plan_training_memory
    from qlora.core.memory import GIB
    from qlora.model.fixtures import architecture_dimensions

    rows = {r["case"]["name"]: r for r in report["results"] if "peak" in r}
    measured_arch = parameter_counts(report_model_config(report))
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
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    if args.from_json:
        reports = [json.loads(Path(path).read_text()) for path in args.from_json.split(",")]
        report = annotate({**reports[0], "results": [r for rep in reports for r in rep["results"]]})
        print(render_tables(report))
        return report
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
            Path(args.out).write_text(json.dumps({**header, "results": results}, indent=2))
        brief = {k: v for k, v in result.items() if k not in ("case", "footprint", "step_rows", "step_flops")}
        print(json.dumps({"case": name, **brief}), flush=True)
    report = {**header, "results": results}
    report = annotate(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(render_tables(report))
    return report

def render_tables(report: dict) -> str:
    """The memory table with the planner, the extrapolation to larger architectures (from the named
    architectures only), and the throughput table when training cases ran."""
    parts = [render_table(report)]
    if not report.get("model_config"):
        parts.append(render_extrapolation(report))
    if any(r["case"]["kind"] == "train" for r in report["results"]):
        parts.append(render_throughput(report))
    return "\n\n".join(parts)

if __name__ == "__main__":
    main()
