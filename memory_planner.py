"""Memory and disk planned before anything loads: the peak a training run, its loading and its merge
will reach, predicted from the model's config.json alone, and the disk its checkpoints and outputs take.
Every figure here is a formula over the config; `tools/benchmark.py` measures the same cases and
prints the planner's error beside each measurement.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from config_utils import ConfigError
from errors import UserError
from memory_usage import GIB, format_size
from training_setup import DEFAULT_TARGET_MODULES, OPTIMIZERS

# Bytes per stored element of the formats the planner knows.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Bits per quantized parameter of bitsandbytes 4-bit (blocksize 64): 4-bit codes + one absmax per block;
# double quant stores the absmax in 8 bits with an fp32 absmax per 256 of them.
QUANT_BITS = {"nf4": 4 + 32 / 64, "fp4": 4 + 32 / 64, "nf4_dq": 4 + 8 / 64 + 32 / (64 * 256),
              "fp4_dq": 4 + 8 / 64 + 32 / (64 * 256)}
# Resident memory of a CPU process that has imported torch, transformers, peft, trl, bitsandbytes and
# datasets, before any model loads (measured here: 0.465 GiB peak RSS, torch 2.13 CPU). CUDA's max
# allocated counts tensors only, so it has no such term.
CPU_RUNTIME_BYTES = int(0.465 * GIB)
# TRL's chunked log-prob on a device without Triton works on (tokens, 32768) tiles with torch ops; its
# backward (trl/kernels/chunked_logprob.py, _backward_tile) holds ten fp32 tiles at once: the upcast tile,
# the scaled logits, log p, p, the zeroed gradient, the target mask as float, mask - p, its product with
# the incoming gradient, and the two rescaled gradients. On CUDA a Triton kernel folds the tile in place.
TRL_VOCAB_CHUNK = 32768
CPU_LOSS_TILES = 10
# bitsandbytes' optimizers on CPU (backends/cpu/ops.py) update one parameter at a time through fp32
# copies: for 8-bit AdamW the two dequantized states, the gradient, the parameter, sqrt(state2) and the
# denominator. Six fp32 copies of the largest trainable tensor: 3.5 GiB for full fine-tuning of
# Qwen3-0.6B (its 155.6M-parameter embedding), a few MB for LoRA. On CUDA the kernels update in place.
CPU_BNB_OPTIMIZER_COPIES = 6

@dataclass(frozen=True)
class TrainingSetup:
    """What the planner needs to know about a training run besides the model's config."""

    method: str = "qlora"  # qlora | lora | full
    lora_r: int = 64
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES  # projection names of a decoder layer
    seq_len: int = 512
    batch_size: int = 1
    gradient_checkpointing: bool = True
    optim: str = "paged_adamw_8bit"  # 01_Train.py's default
    fused_loss: bool = True  # TRL's chunked LM head (SFTTrainer's default); False = full fp32 logits
    quant: str = "nf4_dq"  # qlora only: nf4 | nf4_dq | fp4 | fp4_dq
    embeddings_dtype: str = "bf16"  # qlora: bf16 (prepare_kbit_model) | fp32 (peft's upcast kept)
    norms_dtype: str = "bf16"  # bf16 (prepare_kbit_model, TRL's recipe) | fp32 (peft's upcast kept)
    device: str = "cpu"  # cpu (peak RSS, with the runtime term) | cuda (max allocated)
    checkpoint_mapped: bool = False  # plain from_pretrained (TRL's recipe): the bf16 checkpoint stays memory-mapped

def _linear_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of one decoder layer of a Llama/Qwen-style model."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}

def parameter_counts(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Parameters by kind: the decoder's Linear weights (what 4-bit quantizes), embedding, head, norms."""
    shapes = _linear_shapes(cfg)
    layers, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    embedding = cfg["vocab_size"] * h
    return {
        "linear": layers * sum(i * o for i, o in shapes.values()),
        "embedding": embedding,
        "lm_head": 0 if cfg.get("tie_word_embeddings", False) else embedding,
        "norms": layers * (2 * h + 2 * head_dim) + h,
    }

def lora_parameter_count(cfg: Mapping[str, Any], rank: int, targets: tuple[str, ...]) -> int:
    shapes = _linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"planner knows the projections {', '.join(shapes)}; got {', '.join(unknown)}")
    return cfg["num_hidden_layers"] * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

def layer_activation_bytes(cfg: Mapping[str, Any], tokens: int, lora_targets: tuple[str, ...]) -> int:
    """Bytes one decoder layer keeps for backward, under bf16 autocast: bf16 inputs of every projection,
    fp32 copies inside the RMSNorms (hidden and q/k head norms), rotary q/k, attention q/k/v/out,
    the SwiGLU's gate/up/product, and for each LoRA-wrapped projection its dropout output and mask."""
    shapes = _linear_shapes(cfg)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    per_token = (
        2 * 10 * h  # two RMSNorms: fp32 input, fp32 normalised copy, bf16 output
        + 10 * (q + kv)  # q_norm / k_norm, same pattern per head
        + 2 * (h + q + h + inter)  # bf16 inputs of q/k/v (shared), o, gate/up (shared), down
        + 2 * (q + kv)  # rotary outputs
        + 2 * (2 * q + 2 * kv)  # attention: q, k, v saved, output
        + 2 * 3 * inter  # SwiGLU: gate, up, silu(gate)
        + sum(3 * shapes[t][0] for t in lora_targets)  # LoRA dropout: bf16 output + bool mask per module
    )
    return tokens * per_token

def plan_load_memory(cfg: Mapping[str, Any], quant: str | None, device: str = "cpu",
                     checkpoint_mapped: bool = False) -> dict[str, Any]:
    """Predicted peak while loading a bf16 checkpoint as bf16 (`quant` None) or 4-bit, before training.

    On CPU: the runtime, the converted weights (embedding, head and norms in bf16) and the bf16 tensor
    being quantized. A bf16 load maps the checkpoint and its weights are the mapped pages, read only when
    first used (so they count in training, not here). A 4-bit load by the project (model_loading: pread,
    freed buffers leave the heap) holds one bf16 tensor at a time; one by plain from_pretrained
    (`checkpoint_mapped`) keeps every page it read mapped: the bf16 bytes of all quantized weights.
    """
    if quant is not None and quant not in QUANT_BITS:
        raise ValueError(f"quant={quant!r} is unknown; allowed: {', '.join(QUANT_BITS)}")
    counts = parameter_counts(cfg)
    bits = 16 if quant is None else QUANT_BITS[quant]
    weights = counts["linear"] * bits / 8 + 2 * (counts["embedding"] + counts["lm_head"] + counts["norms"])
    cpu = device == "cpu"
    if quant is None:  # on CPU the weights are the mapped checkpoint, not yet read
        parts = {"runtime": CPU_RUNTIME_BYTES if cpu else 0, "weights": 0 if cpu else int(weights)}
    else:
        largest = max(i * o for i, o in _linear_shapes(cfg).values())
        parts = {"runtime": CPU_RUNTIME_BYTES if cpu else 0, "weights": int(weights),
                 "checkpoint_pages": 2 * counts["linear"] if cpu and checkpoint_mapped else 0,
                 "transient": 2 * largest}  # the bf16 tensor being quantized
    total = sum(parts.values())
    return {"parts": parts, "peak_bytes": total, "peak_gib": round(total / GIB, 3)}

def plan_training_memory(cfg: Mapping[str, Any], setup: TrainingSetup) -> dict[str, Any]:
    """Predicted peak training memory, by component, in bytes (and the total in GiB).

    `cfg` is a model config as a dict (config.json's text config). Nothing is loaded: the prediction
    counts weights, LoRA adapters, gradients, optimizer state, activations (with or without gradient
    checkpointing) and the vocabulary logits, plus the runtime's own memory on CPU; the peak is the
    larger of that training peak and the loading peak (on CPU the bf16 checkpoint is mapped in while
    the weights are converted).
    """
    if setup.method not in ("qlora", "lora", "full"):
        raise ValueError(f"method={setup.method!r} is unknown; allowed: qlora, lora, full")
    if setup.optim not in OPTIMIZERS:
        raise ValueError(f"optim={setup.optim!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
    if setup.method == "qlora" and setup.quant not in QUANT_BITS:
        raise ValueError(f"quant={setup.quant!r} is unknown; allowed: {', '.join(QUANT_BITS)}")
    counts = parameter_counts(cfg)
    plain = counts["embedding"] + counts["lm_head"]
    tokens = setup.seq_len * setup.batch_size
    layers, h, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    if setup.method == "qlora":
        weights = (counts["linear"] * QUANT_BITS[setup.quant] / 8 + plain * DTYPE_BYTES[setup.embeddings_dtype]
                   + counts["norms"] * DTYPE_BYTES[setup.norms_dtype])
        trainable, trainable_bytes = lora_parameter_count(cfg, setup.lora_r, setup.target_modules), 2  # TRL: bf16
    elif setup.method == "lora":
        weights = 2 * (counts["linear"] + plain + counts["norms"])
        trainable, trainable_bytes = lora_parameter_count(cfg, setup.lora_r, setup.target_modules), 4  # peft: fp32
    else:
        weights = 2 * (counts["linear"] + plain + counts["norms"])
        trainable, trainable_bytes = sum(counts.values()), 2
    adapters = trainable * trainable_bytes if setup.method != "full" else 0
    targets = setup.target_modules if setup.method != "full" else ()
    one_layer = layer_activation_bytes(cfg, tokens, targets)
    if setup.gradient_checkpointing:
        activations = layers * tokens * h * 2 + one_layer  # each layer's bf16 input, plus one layer recomputed
    else:
        activations = layers * one_layer
    # Full logits: bf16 from the head, fp32 upcast, fp32 log-softmax and its fp32 gradient. TRL's fused
    # head: nothing on CUDA (a Triton kernel folds each tile in place), fp32 tiles on CPU (CPU_LOSS_TILES).
    logits = tokens * vocab * (2 + 4 + 4 + 4) if not setup.fused_loss else 0
    if setup.fused_loss and setup.device == "cpu":
        logits = CPU_LOSS_TILES * tokens * min(vocab, TRL_VOCAB_CHUNK) * 4
    cpu_mapped = setup.device == "cpu" and setup.checkpoint_mapped and setup.method == "qlora"
    if setup.method == "full":
        largest_trainable = max([vocab * h] + [i * o for i, o in _linear_shapes(cfg).values()])
    else:
        largest_trainable = setup.lora_r * max(max(i, o) for i, o in _linear_shapes(cfg).values())  # A or B
    optimizer_step = (CPU_BNB_OPTIMIZER_COPIES * 4 * largest_trainable
                      if setup.device == "cpu" and OPTIMIZERS[setup.optim].bitsandbytes else 0)
    head_cast = plain // (2 if counts["lm_head"] else 1) * 2 if setup.embeddings_dtype == "fp32" and setup.method == "qlora" else 0
    parts = {
        "runtime": CPU_RUNTIME_BYTES if setup.device == "cpu" else 0,
        "weights": int(weights),
        "adapters": int(adapters),
        "gradients": int(trainable * trainable_bytes),
        "optimizer": int(trainable * OPTIMIZERS[setup.optim].state_bytes),
        "activations": int(activations),
        "logits": int(logits),
        "head_cast": int(head_cast),  # bf16 copy of an fp32 head made by autocast and kept for backward
        "checkpoint_pages": 2 * counts["linear"] if cpu_mapped else 0,  # read while quantizing, still mapped
        "optimizer_step": optimizer_step,  # fp32 working copies of one parameter (CPU bitsandbytes)
    }
    if setup.device != "cpu" and OPTIMIZERS[setup.optim].paged:
        # bitsandbytes allocates paged optimizer state in CUDA unified memory, outside PyTorch's allocator:
        # it does not count in max_allocated (measured on an H200: r=256 planned +81..92% with it counted).
        parts["optimizer_paged"] = parts.pop("optimizer")
    train_peak = sum(v for k, v in parts.items() if k != "optimizer_paged")
    # Loading comes before kbit preparation: the weights are as loaded (see plan_load_memory).
    load_peak = plan_load_memory(cfg, setup.quant if setup.method == "qlora" else None, setup.device,
                                 setup.checkpoint_mapped)["peak_bytes"]
    total = max(train_peak, load_peak)
    return {"parts": parts, "train_peak_bytes": train_peak, "load_peak_bytes": load_peak,
            "peak_phase": "training" if train_peak >= load_peak else "loading",
            "peak_bytes": total, "peak_gib": round(total / GIB, 3), "trainable_params": trainable, "params": counts}

def plan_for_train_config(model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], device: str) -> dict[str, Any]:
    """The planner applied to 01_Train.py's resolved constants; `{"peak_gib": None, "reason": ...}` when
    the run has something the planner does not model (its prediction is then simply absent)."""
    targets = tuple(str(t).rsplit(".", 1)[-1] for t in train_cfg["target_modules"])
    method = "qlora" if str(train_cfg["QUANT_METHOD"]).upper() == "QLORA" else (
        "full" if train_cfg["PEFT_CONFIG"] == "Full" else "lora")
    setup = TrainingSetup(
        method=method, lora_r=train_cfg["lora_r"], target_modules=targets, seq_len=train_cfg["max_seq_length"],
        batch_size=train_cfg["per_device_train_batch_size"], gradient_checkpointing=train_cfg["gradient_checkpointing"],
        optim=train_cfg["optim"], device=device,
        # model_loading.load_causal_lm reads with pread, except a model with its own code: from_pretrained maps it
        checkpoint_mapped=bool(train_cfg.get("trust_remote_code", False)))
    try:
        plan = {"setup": setup.__dict__ | {"target_modules": list(targets)}, **plan_training_memory(model_cfg, setup)}
    except (KeyError, ValueError) as err:
        return {"peak_gib": None, "reason": str(err)}
    if train_cfg["merge_after_train"] and method != "full":
        # The merge replaces layers one at a time: at its end the whole model is bf16, beside the adapters.
        merge_peak = plan["parts"]["runtime"] + 2 * sum(plan["params"].values()) + plan["parts"]["adapters"]
        if device != "cpu":  # measured on an H200: the 4-bit base was still allocated at the merge's peak
            merge_peak += plan["parts"]["weights"]
        plan["merge_peak_bytes"] = merge_peak
        if merge_peak > plan["peak_bytes"]:
            plan.update(peak_bytes=merge_peak, peak_gib=round(merge_peak / GIB, 3), peak_phase="merge")
    return plan

# The merge check (merge_utils.measure_candidate) keeps the trained model's fp32 logits of every check
# row and, for the row being compared, holds about eight fp32 copies of the candidate's: its logits, the
# masked reference and candidate, their difference and its square, two log-softmaxes and the KL product.
MERGE_CHECK_ROW_COPIES = 8

def with_merge_check(plan: Mapping[str, Any], row_tokens: list[int], vocab_size: int, device: str) -> dict[str, Any]:
    """The plan with the merge check's logits added to its merge phase, once the check rows are tokenized
    (before the merge runs). On CPU the logits live in host memory; on CUDA only the row being run is on
    the GPU (its bf16 logits and their fp32 upcast) before it moves to the host."""
    if "merge_peak_bytes" not in plan or not row_tokens:
        return dict(plan)
    if device == "cpu":
        logits = 4 * vocab_size * (sum(row_tokens) + MERGE_CHECK_ROW_COPIES * max(row_tokens))
    else:
        logits = 6 * vocab_size * max(row_tokens)
    merge_peak = plan["merge_peak_bytes"] + logits
    out = dict(plan, merge_peak_bytes=merge_peak, merge_check_logits_bytes=logits, merge_check_tokens=sum(row_tokens))
    if merge_peak > plan["peak_bytes"]:
        out.update(peak_bytes=merge_peak, peak_gib=round(merge_peak / GIB, 3), peak_phase="merge")
    return out

def format_plan(plan: Mapping[str, Any]) -> str:
    """One line: the predicted peak and its parts in GiB."""
    if plan.get("peak_gib") is None:
        return f"memory not predicted: {plan.get('reason')}"
    parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in plan["parts"].items() if value)
    where = "peak RSS" if plan["setup"]["device"] == "cpu" else "max allocated"
    return (f"predicted {where} {plan['peak_gib']:.2f} GiB ({plan['peak_phase']}): training "
            f"{plan['train_peak_bytes'] / GIB:.2f} = {parts}; loading {plan['load_peak_bytes'] / GIB:.2f}"
            + (f"; merge {plan['merge_peak_bytes'] / GIB:.2f}" if "merge_peak_bytes" in plan else "")
            + (" + the merge check's logits (added once its rows are tokenized)"
               if "merge_peak_bytes" in plan and "merge_check_logits_bytes" not in plan else ""))

def with_measured_peak(plan: Mapping[str, Any], peak: Mapping[str, Any]) -> dict[str, Any]:
    """The plan with the measured peak (max allocated on CUDA, else peak RSS) and the planner's relative error."""
    measured = peak["overall_max_allocated_gib"] if peak["device"] == "cuda" else peak["peak_rss_gib"]
    out = dict(plan, measured_gib=measured)
    if plan.get("peak_gib") is not None and measured:
        out["relative_error"] = round((plan["peak_gib"] - measured) / measured, 4)
    return out

def disk_needed(trainable_bytes: int, trainable_params: int, optim: str, keep_checkpoints: int,
                merged_params: int) -> dict[str, int]:
    """Estimated bytes a run writes: `keep_checkpoints` + 1 checkpoints (the Trainer writes a new one before
    rotating the oldest out), the final adapter, and a bf16 merged model of `merged_params` (0: none)."""
    checkpoint = int(trainable_bytes + trainable_params * OPTIMIZERS[optim].state_bytes) + 1_000_000
    merged = merged_params * 2
    return {"checkpoint": checkpoint, "adapter": trainable_bytes, "merged": merged,
            "total": (keep_checkpoints + 1) * checkpoint + trainable_bytes + merged}

def disk_needed_for(model, cfg: Mapping[str, Any]) -> dict[str, int]:
    """`disk_needed` for a model ready to train under the run's constants."""
    from memory_usage import count_parameters

    trainable, total = count_parameters(model)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    head_copy = model.get_output_embeddings().weight.numel() if cfg["keep_lm_head_fp16"] else 0  # untied fp16 head
    writes_model = cfg["merge_after_train"] or cfg["PEFT_CONFIG"] == "Full"
    return disk_needed(trainable_bytes, trainable, cfg["optim"], cfg["keep_checkpoints"],
                       total + head_copy if writes_model else 0)


def check_disk_for_run(model, cfg: Mapping[str, Any], root: Path) -> dict[str, int]:
    """What the run will write, checked against the free disk under `root` before training starts."""
    from run_log import step

    disk = disk_needed_for(model, cfg)
    check_free_disk(root, disk["total"], f"{cfg['keep_checkpoints'] + 1} checkpoints and the outputs")
    step("disk", "%s per checkpoint, %s merged model, %s in all", format_size(disk["checkpoint"]),
         format_size(disk["merged"]), format_size(disk["total"]))
    return disk


def _existing_ancestor(path: Path) -> Path:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return probe

def check_free_disk(path: Path, needed: int, what: str) -> None:
    """ConfigError when the filesystem holding `path` has less than `needed` bytes free."""
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed:
        raise ConfigError(f"not enough free disk under {path} for {what}: need ~{format_size(needed)}, "
                          f"{format_size(free)} free")

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded")  # safetensors' Rust I/O errors
TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter")  # torch.save's zip writer, errno not kept

def explain_disk_full(err: BaseException, needed_bytes: int, directory: Path) -> UserError | None:
    """The one-line error for a save that failed because the disk filled up, or None when `err` is something else.

    ENOSPC / EDQUOT (Python's OSError, safetensors' message) count always. torch.save reports a full disk
    only as a failed write of its zip stream ('[enforce fail at inline_container.cc] . unexpected pos'):
    that counts when the filesystem now has less than `needed_bytes` free.
    """
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    free = shutil.disk_usage(_existing_ancestor(directory)).free
    full = any(getattr(e, "errno", None) in DISK_FULL_ERRNOS or any(t in str(e) for t in DISK_FULL_TEXTS) for e in chain)
    torch_write = any(t in str(e) for e in chain for t in TORCH_WRITE_FAILED)
    if not (full or (torch_write and free < needed_bytes)):
        return None
    return UserError(f"the disk under {directory} is full: saving needs ~{format_size(needed_bytes)} free there, "
                     f"{format_size(free)} is; free some space, then rerun the same command: it resumes from the "
                     "last complete checkpoint")
