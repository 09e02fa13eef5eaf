"""The benchmark's worker: one case measured in a process of its own (python -m qlora.bench.worker, started by
tools/benchmark.py), its result printed as one `RESULT {json}` line for the parent."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from qlora.bench.cases import Case, CASES_BY_NAME, LONG_ROW_CHARS, case_config, row_count
from qlora.config import training_defaults
from qlora.core.memory import GIB, count_parameters, peak_memory_report, proc_status_bytes, weight_footprint
from qlora.data.synthetic import long_rows
from qlora.model.loading import load_causal_lm, load_tokenizer, pick_device
from qlora.planner.memory import tokens_of_row
from qlora.planner.throughput import model_flops_utilization, training_flops
from qlora.train.peft import DEFAULT_TARGET_MODULES, prepare_for_training, weights_dtype
from qlora.train.trainer import build_trainer as build_project_trainer
from quantization_utils import nf4_config


def bnb_config_for(quant: str | None):
    """The 4-bit loading config of a case's weight format (None: bf16)."""
    if quant is None:
        return None
    return nf4_config(quant_type="fp4" if quant == "fp4" else "nf4", double_quant=quant == "nf4_dq")


def proc_status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssFile) in GiB; None off Linux."""
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
    for name in ("datasets", "peft", "trl"):  # the stack a training process has loaded: the planner's runtime term
        importlib.import_module(name)

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


# ----- a training case: the trainer as each recipe builds it -------------------------------------------

def case_trainer(case: Case, model_dir: str, seq: int, batch: int, rank: int, steps: int, work: Path):
    """The model and SFTTrainer of one training case: built by qlora.train exactly as 01_Train.py builds
    them, by TRL's documented recipe (the baseline), or by unsloth's (the outside anchor)."""
    from datasets import Dataset

    rows = Dataset.from_list(long_rows(row_count(case, steps, batch), 8 * seq, variable=case.variable_lengths))
    if case.recipe == "unsloth":
        return unsloth_trainer(case, model_dir, rows, seq, batch, rank, steps, work)

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


# ----- measuring ---------------------------------------------------------------------------------------

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
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    flops = [training_flops(cfg, step, None if case.peft == "full" else rank, DEFAULT_TARGET_MODULES,
                            case.gradient_checkpointing, full=case.peft == "full").total for step in rows]
    per_s = sum(flops) / sum(wall)
    return {"step_flops": flops, "model_tflops_per_s": per_s / 1e12, "device_name": device_name(),
            "mfu": model_flops_utilization(sum(flops), sum(wall), device_name())}


def measure_training(case: Case, model_dir: str, seq: int, batch: int, rank: int, steps: int, warmup: int,
                     work: Path) -> dict:
    trainer = case_trainer(case, model_dir, seq, batch, rank, steps + warmup, work)
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

    tokenizer = load_tokenizer(model_dir)
    rows = long_rows(8, 8 * seq)
    rows[0] = long_rows(1, LONG_ROW_CHARS)[0]
    tokens = tokens_of_row(tokenizer, rows[0])
    cfg = {**training_defaults(), "lora_r": rank, "max_seq_length": seq, "max_steps": 1}
    model = prepare_for_training(load_causal_lm(model_dir, None, "cpu"), cfg, quantized=False)
    # the same trainer on the ordinary rows first: what building a trainer costs (mapped weights read, ...)
    build_project_trainer(model, tokenizer, cfg, Dataset.from_list(rows[1:]), None, work / "short", "cpu", save_strategy="no")
    before = proc_status_gib("VmRSS")
    reset_peak_rss()
    build_project_trainer(model, tokenizer, cfg, Dataset.from_list(rows), None, work / "long", "cpu", save_strategy="no")
    peak = proc_status_gib("VmHWM")
    return {"longest_row_tokens": tokens, "longest_row_chars": len(rows[0]["completion"][0]["content"]),
            "rss_before_gib": before, "tokenize_peak_gib": peak,
            "bytes_per_token": round((peak - before) * 1024**3 / tokens, 1),
            "peak": {"device": "cpu", "peak_rss_gib": peak - before}}


def run(args) -> dict:
    """Measure the case `args.case` names."""
    case = CASES_BY_NAME[args.case]
    batch = case.batch or args.batch
    if case.kind == "weights":
        result = measure_weights(case, args.model_dir)
    elif case.kind == "tokenize":
        result = measure_tokenize(args.model_dir, args.seq, args.rank, Path(args.work_dir) / case.name)
    else:
        result = measure_training(case, args.model_dir, args.seq, batch, args.rank, args.steps, args.warmup,
                                  Path(args.work_dir) / case.name)
    result.update(case=asdict(case), batch=batch, seq=args.seq, rank=args.rank)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", required=True, choices=sorted(CASES_BY_NAME), help="the case to measure")
    parser.add_argument("--model-dir", required=True, help="the model directory the case loads")
    parser.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--batch", type=int, required=True, help="sequences per step (a case with its own batch keeps it)")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank")
    parser.add_argument("--steps", type=int, required=True, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, required=True, help="steps run before measuring")
    parser.add_argument("--work-dir", required=True, help="the case's scratch goes into WORK_DIR/CASE")
    print("RESULT " + json.dumps(run(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
