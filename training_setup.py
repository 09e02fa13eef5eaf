"""How a loaded model becomes a trainer: the optimizer registry, the default LoRA targets, the LoRA and
SFT configurations, and the SFTTrainer. Fine-tuning/01_Train.py and tools/benchmark.py both build
through `prepare_for_training` and `build_trainer`, so the benchmark measures what the script runs."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from errors import UserError

@dataclass(frozen=True)
class Optimizer:
    state_bytes: float  # optimizer state per trainable parameter
    paged: bool  # state in CUDA unified memory: outside PyTorch's allocator; runs unpaged on CPU
    bitsandbytes: bool  # a bitsandbytes optimizer: on CPU it updates through fp32 working copies

# Two moments per parameter: fp32 (8 bytes) or blockwise 8-bit (2 bytes). Adafactor keeps a factored second
# moment (a row and a column per matrix) and no first moment: next to nothing per parameter.
OPTIMIZERS: dict[str, Optimizer] = {
    "paged_adamw_8bit": Optimizer(2, paged=True, bitsandbytes=True),
    "paged_adamw_32bit": Optimizer(8, paged=True, bitsandbytes=True),
    "adamw_bnb_8bit": Optimizer(2, paged=False, bitsandbytes=True),
    "adamw_torch": Optimizer(8, paged=False, bitsandbytes=False),
    "adafactor": Optimizer(0, paged=False, bitsandbytes=False),
}
# Every projection of a Llama/Qwen/Gemma/Mistral decoder layer (attention and MLP), as the QLoRA paper trains.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def target_modules_regex(patterns: Iterable[str]) -> str:
    """peft `target_modules` regex for names ('q_proj': any module ending so) and globs
    ('model.layers.*.self_attn.q_proj': full module names)."""
    parts = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?[."):
            parts.append(fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(")\\Z"))
        else:
            parts.append(rf"(.*\.)?{re.escape(pattern)}")
    return "|".join(f"(?:{p})" for p in parts)

def linear_module_names(model) -> list[str]:
    """Full names of the Linear (incl. 4-bit / 8-bit) modules of a model, lm_head excluded."""
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]

def check_target_modules(model, patterns: Iterable[str]) -> list[str]:
    """Module names the patterns select; an error naming the modules that exist if a pattern matches none."""
    names = linear_module_names(model)
    selected = set()
    for pattern in patterns:
        regex = re.compile(target_modules_regex([pattern]))
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(f"target module {pattern!r} matches no Linear module; this model has: {', '.join(kinds)}")
        selected.update(hits)
    return sorted(selected)

def lora_config(cfg: Mapping[str, Any]):
    """peft's LoraConfig from the run's constants (DoRA when PEFT_CONFIG is DoRa)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=target_modules_regex(cfg["target_modules"]), task_type="CAUSAL_LM",
                      use_dora=cfg["PEFT_CONFIG"] == "DoRa")

def prepare_for_training(model, cfg: Mapping[str, Any], quantized: bool, fsdp: bool = False,
                         keep_embeddings_bf16: bool = True):
    """k-bit preparation of a 4-bit base (not under FSDP: its fp32 upcasts would mix dtypes inside FSDP's
    flat shards), then the LoRA adapters on the targeted modules (none for full fine-tuning)."""
    from peft import get_peft_model

    from model_loading import prepare_kbit_model

    if quantized and not fsdp:
        model = prepare_kbit_model(model, cfg["gradient_checkpointing"], keep_embeddings_bf16)
    if cfg["PEFT_CONFIG"] == "Full":
        return model
    check_target_modules(model, cfg["target_modules"])
    return get_peft_model(model, lora_config(cfg))

def sft_config(cfg: Mapping[str, Any], output_dir: Path, device: str, **overrides):
    """TRL's SFTConfig for the run: bf16, loss on completions only, resumable checkpoints every save_steps."""
    from trl import SFTConfig

    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg["per_device_train_batch_size"],
        per_device_eval_batch_size=cfg["per_device_train_batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"], learning_rate=cfg["learning_rate"],
        num_train_epochs=cfg["num_train_epochs"], max_steps=cfg["max_steps"], max_length=cfg["max_seq_length"],
        optim=cfg["optim"], logging_steps=cfg["logging_steps"], seed=cfg["seed"], bf16=True,
        gradient_checkpointing=cfg["gradient_checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps", save_steps=cfg["save_steps"], save_total_limit=cfg["keep_checkpoints"],
        report_to=[], completion_only_loss=True, use_cpu=device == "cpu",
    )
    options.update(overrides)
    return SFTConfig(**options)

def build_trainer(model, tokenizer, cfg: Mapping[str, Any], train_data, eval_data, output_dir: Path, device: str,
                  callbacks=(), compute_loss_func=None, **sft_overrides):
    """The SFTTrainer of a run; trainable parameters keep their dtype when a checkpoint is resumed, and a
    `StopOnNonFiniteLossCallback` among `callbacks` is given the trainer's losses to watch."""
    from trl import SFTTrainer

    from checkpoint_utils import StopOnNonFiniteLossCallback, keep_trainable_dtypes

    trainer = SFTTrainer(model=model, args=sft_config(cfg, output_dir, device, **sft_overrides),
                         train_dataset=train_data, eval_dataset=eval_data if eval_data is not None and len(eval_data) else None,
                         processing_class=tokenizer, callbacks=list(callbacks), compute_loss_func=compute_loss_func)
    keep_trainable_dtypes(trainer)
    for callback in callbacks:
        if isinstance(callback, StopOnNonFiniteLossCallback):
            callback.watch(trainer)
    return trainer
