"""How a loaded model becomes a trainer: the optimizer registry, the default LoRA targets, the LoRA and
SFT configurations, and the SFTTrainer. Fine-tuning/01_Train.py and tools/benchmark.py both build
through `prepare_for_training` and `build_trainer`, so the benchmark measures what the script runs."""

from __future__ import annotations

import fnmatch
import re
from enum import StrEnum
from typing import Any, Iterable, Mapping

from qlora.core.errors import UserError
from qlora.core.logs import step
from qlora.core.memory import count_parameters
from qlora.model.base_weights import MERGE_BASE_WEIGHTS
from qlora.model.checkpoint import checkpoint_reader
from qlora.model.loading import keep_4bit_storage_layout, prepare_kbit_model


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

def check_target_modules_before_loading(cfg: Mapping[str, Any]) -> None:
    """`check_target_modules` on the model built from its config.json on the meta device (no weights, no memory):
    a target_modules pattern that matches nothing is refused in a second, not after the weights have loaded."""
    if cfg["PEFT_CONFIG"] == PeftKind.FULL:
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg["MODEL_NAME"], trust_remote_code=cfg["trust_remote_code"])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg["trust_remote_code"])
    check_target_modules(model, cfg["target_modules"])

# init_lora_weights constant -> peft's init_lora_weights. LoftQ on a 4-bit base starts from peft's default and
# then replaces A and B (`loftq_initialise`); peft's own "loftq" would rerun LoftQ when the adapter is loaded.
LORA_INITS = {"default": True, "gaussian": "gaussian", "loftq": True}


def lora_config(cfg: Mapping[str, Any]):
    """peft's LoraConfig from the run's constants (DoRA when PEFT_CONFIG is DoRa, QDoRA on a 4-bit base)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=target_modules_regex(cfg["target_modules"]), task_type="CAUSAL_LM",
                      use_dora=cfg["PEFT_CONFIG"] == "DoRa", use_rslora=cfg["use_rslora"],
                      init_lora_weights=LORA_INITS[cfg["init_lora_weights"]])


# Full fine-tuning's weights as the optimizer updates them. bf16 weights: an update under half a bf16 step of its
# weight (2^-9 to 2^-8 of it) rounds away, so at small learning rates training stalls. fp32 master weights with
# bf16 autocast compute keep every update, at twice the memory of the weights and their gradients.
class PeftKind(StrEnum):
    """PEFT_CONFIG: what trains."""

    LORA = "LoRa"
    DORA = "DoRa"  # learned per-output magnitude (QDoRA on a 4-bit base)
    FULL = "Full"  # every weight (no adapter)


class FullWeightsDtype(StrEnum):
    """full_weights_dtype: the dtype full fine-tuning keeps the weights in."""

    BF16 = "bf16"
    FP32 = "fp32"


FULL_WEIGHTS_DTYPES = {FullWeightsDtype.BF16: "bfloat16", FullWeightsDtype.FP32: "float32"}  # torch names

def weights_dtype(cfg: Mapping[str, Any]):
    """The torch dtype the model loads in: full_weights_dtype for full fine-tuning, else bf16 (a LoRA or DoRA run
    trains adapters over a frozen bf16 or 4-bit base)."""
    import torch

    name = FULL_WEIGHTS_DTYPES[cfg["full_weights_dtype"]] if cfg["PEFT_CONFIG"] == PeftKind.FULL else "bfloat16"
    return getattr(torch, name)


def lora_scaling(cfg: Mapping[str, Any]) -> float:
    """The factor peft multiplies B @ A by: lora_alpha / lora_r, or lora_alpha / sqrt(lora_r) with rsLoRA."""
    return cfg["lora_alpha"] / (cfg["lora_r"] ** 0.5 if cfg["use_rslora"] else cfg["lora_r"])


def peft_options(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """metadata.json's `peft_options`: how the adapter was built (None for full fine-tuning). adapter_config.json
    holds the same except LoftQ, which it records as peft's default init (see LORA_INITS)."""
    if cfg["PEFT_CONFIG"] == PeftKind.FULL:
        return None
    return {"type": cfg["PEFT_CONFIG"], "use_dora": cfg["PEFT_CONFIG"] == "DoRa", "use_rslora": cfg["use_rslora"],
            "init_lora_weights": cfg["init_lora_weights"], "lora_r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"],
            "scaling": lora_scaling(cfg)}


def loftq_initialise(peft_model, model_name: str, adapter: str = "default") -> dict[str, float]:
    """LoftQ (Li et al., 2023) for adapters on a 4-bit base: each pair starts at the best rank-r approximation of
    its layer's quantization error, scale * B @ A = SVD_r(W - dequant(NF4(W))), W read from the 16-bit checkpoint,
    so training starts nearer the 16-bit model. peft's replace_lora_weights_loftq computes on CUDA only and leaves
    out the LoRA scale (alpha / r), which would shrink the correction to scale times itself. Returns the relative
    error ||W - model|| / ||W|| over all adapted layers, "before" (4-bit alone) and "after" (4-bit + adapter)."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    read = checkpoint_reader(model_name)
    sums = {"weight": 0.0, "before": 0.0, "after": 0.0}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
                for key, value in _loftq_layer(module, name, read, adapter).items():
                    sums[key] += value
    if sums["weight"] == 0:
        raise UserError("init_lora_weights=loftq found no LoRA layer on a 4-bit base layer")
    return {key: (sums[key] / sums["weight"]) ** 0.5 for key in ("before", "after")}


def _loftq_layer(module, name: str, read, adapter: str) -> dict[str, float]:
    """Set one layer's A and B by LoftQ; its squared norms of W, of the 4-bit error and of what is left of it."""
    import torch

    layer = module.get_base_layer()
    original = MERGE_BASE_WEIGHTS["original"](layer, name, read)
    residual = original - MERGE_BASE_WEIGHTS["dequantized"](layer, name, read)
    lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    # Above min(out, in) the extra rank components start with A and B at zero, and stay there (neither gets a
    # gradient); B @ A cannot have a rank above min(out, in) anyway.
    keep = min(module.r[adapter], S.numel())
    root = (S[:keep] / module.scaling[adapter]).sqrt()
    A, B = torch.zeros_like(lora_A, dtype=torch.float32), torch.zeros_like(lora_B, dtype=torch.float32)
    A[:keep], B[:, :keep] = root[:, None] * Vh[:keep], U[:, :keep] * root
    lora_A.data, lora_B.data = A.to(lora_A.dtype), B.to(lora_B.dtype)
    left = residual - module.get_delta_weight(adapter).to(torch.float32)
    return {"weight": original.pow(2).sum().item(), "before": residual.pow(2).sum().item(),
            "after": left.pow(2).sum().item()}


def prepare_for_training(model, cfg: Mapping[str, Any], quantized: bool, fsdp: bool = False,
                         keep_embeddings_bf16: bool = True):
    """k-bit preparation of a 4-bit base (not under FSDP: its fp32 upcasts would mix dtypes inside FSDP's
    flat shards), then the LoRA adapters on the targeted modules (none for full fine-tuning), LoftQ-initialised
    when asked."""
    from peft import get_peft_model

    if quantized and not fsdp:
        model = prepare_kbit_model(model, cfg["gradient_checkpointing"], keep_embeddings_bf16)
    if cfg["PEFT_CONFIG"] != PeftKind.FULL:
        check_target_modules(model, cfg["target_modules"])
        model = get_peft_model(model, lora_config(cfg))
    if quantized:  # trained, evaluated, checked and merged in the layout it trains in
        keep_4bit_storage_layout(model)
    if cfg["init_lora_weights"] == "loftq":
        error = loftq_initialise(model, cfg["MODEL_NAME"])
        step("model", "LoftQ init: ||W - model|| / ||W|| over the adapted layers %.4g (4-bit alone) -> %.4g",
             error["before"], error["after"])
    trainable, total = count_parameters(model)
    step("model", "trainable params %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model
