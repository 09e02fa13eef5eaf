"""The benchmark's cases (one configuration each, run in its own process by qlora.bench.worker), their
groups, the 01_Train.py constants each runs with, what each needs to run here, and the random-weight model
they run on."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from qlora.config import training_defaults
from qlora.model.fixtures import (architecture, build_random_model, model_dimensions, tokenizer_corpus,
                                  train_bpe_tokenizer)


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


def case_config(case: Case, seq: int, batch: int, rank: int, steps: int) -> dict:
    """01_Train.py's constants as the script has them, with this case's levers and sizes applied."""
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


# ----- what a case needs ------------------------------------------------------------------------------

def unsloth_installed(site: str | None) -> bool:
    return bool(site) and (Path(site) / "unsloth" / "__init__.py").is_file()


def skip_reason(case: Case, unsloth_site: str | None = None) -> str | None:
    """Why a case cannot run here (None: it can): what it needs, checked before a worker starts."""
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


# ----- the model every case runs on ---------------------------------------------------------------------

def benchmark_architecture(arch: str, layers: int | None = None) -> dict:
    """The config.json the benchmark builds: a shipped architecture, with `layers` decoder layers when given
    (widths, vocabulary, tying and dtypes stay the published ones)."""
    config = architecture(arch)
    if layers is not None:
        config["num_hidden_layers"] = layers
        config.pop("layer_types", None)  # one entry per layer: the model rebuilds it from its pattern
    return config


def build_model(config: dict, model_dir: Path) -> None:
    """A random-weight model of `config` (bf16 safetensors) with the project's small BPE tokenizer."""
    dimensions = model_dimensions(config)
    if (model_dir / "config.json").exists():
        saved = json.loads((model_dir / "config.json").read_text())
        if saved.get("model_type") == config["model_type"] and all(
                saved.get(k) == v for k, v in dimensions.items() if not isinstance(v, dict)):
            return
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), 512)
    build_random_model(model_dir, tokenizer, config["model_type"], **dimensions)
