"""Memory measured: peak GPU memory per device (or peak RSS without CUDA), and the bytes a model's
weights really take, counting bitsandbytes' quantization state (absmax, nested double-quant state)."""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

GB = 1024**3


def proc_status_bytes(field: str) -> int | None:
    """A memory field of Linux's /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in bytes; None elsewhere."""
    status = Path("/proc/self/status")
    for line in (status.read_text().splitlines() if status.exists() else []):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image: Linux's VmHWM, else ru_maxrss (macOS: bytes).

    Not ru_maxrss on Linux: a child starts from its parent's resident size at fork and keeps it across
    exec, so a worker spawned by a 1.75 GiB parent reported 1.75 GiB for a 0.5 GiB load.
    """
    high_water = proc_status_bytes("VmHWM")
    if high_water is not None:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc on Linux (mallopt, malloc_trim), else None."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)  # the process's own symbols: glibc's when it runs on glibc
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def release_free_heap() -> bool:
    """Give the C heap's free memory back to the OS (glibc's malloc_trim); False where there is none."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextmanager
def freed_blocks_leave_the_heap(threshold_bytes: int = 1 << 20):
    """For a burst of large short-lived allocations (loading and quantizing a checkpoint on the CPU side):
    blocks of `threshold_bytes` or more get their own mapping, so freeing one returns it at once, and
    the heap is trimmed at the end. No-op off glibc.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MiB), after which blocks
    of that size come from the heap, whose freed holes stay resident. Loading Qwen3-0.6B in NF4 on CPU
    peaked at 1.36 to 2.08 GiB RSS that way (0.81 GiB resident after the load once trimmed), and at
    0.99 GiB with this. Setting the threshold disables glibc's adjustment for the rest of the process,
    so on exit it is fixed at 32 MiB, where the adjustment ends up anyway: a 1 MiB threshold during
    training made CPU steps 1.6x slower (every activation a fresh mapping).
    """
    libc = _glibc()
    m_mmap_threshold = -3  # glibc's malloc.h
    if libc is not None:
        libc.mallopt(m_mmap_threshold, threshold_bytes)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(m_mmap_threshold, 32 << 20)
            libc.malloc_trim(0)


def get_peak_vram_gb(devices: list[int] | None = None) -> dict[str, Any]:
    """Peak memory since process start (or the last reset), in GiB.

    With CUDA: max reserved/allocated over `devices` (default: every visible GPU) plus one entry per
    GPU. Without CUDA the GPU fields are None, `device` says "cpu", and `peak_rss_gb` (always present)
    is the measure to read.
    """
    import torch

    report: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "overall_max_reserved_gb": None,
        "overall_max_allocated_gb": None,
        "per_gpu": [],
        "peak_rss_gb": round(peak_rss_bytes() / GB, 3),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()) if devices is None else devices:
            report["per_gpu"].append({
                "gpu": i,
                "name": torch.cuda.get_device_name(i),
                "peak_allocated_gb": round(torch.cuda.max_memory_allocated(i) / GB, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved(i) / GB, 3),
            })
        report["overall_max_reserved_gb"] = max(g["peak_reserved_gb"] for g in report["per_gpu"])
        report["overall_max_allocated_gb"] = max(g["peak_allocated_gb"] for g in report["per_gpu"])
    return report


def _tensor_bytes_once(tensor, seen: set) -> int:
    """Bytes of a tensor, or 0 if its storage was already counted (shared tables count once)."""
    if tensor is None:
        return 0
    key = (tensor.device, tensor.untyped_storage().data_ptr())
    if key in seen:
        return 0
    seen.add(key)
    return tensor.numel() * tensor.element_size()


def _quant_state_bytes(quant_state, seen: set) -> int:
    """Bytes of a bitsandbytes QuantState: absmax and code (+ nested absmax, code and offset with double quant)."""
    if quant_state is None:
        return 0
    total = _tensor_bytes_once(quant_state.absmax, seen) + _tensor_bytes_once(quant_state.code, seen)
    if getattr(quant_state, "nested", False):
        total += _quant_state_bytes(quant_state.state2, seen)
        total += _tensor_bytes_once(quant_state.offset, seen)
    return total


def weight_footprint(model) -> dict[str, int]:
    """Stored bytes of a model's parameters and buffers, split into quantized and plain weights.

    `quantized_params` counts the original (unpacked) number of quantized parameters, so
    `quantized_bytes * 8 / quantized_params` is the real bits per quantized parameter.
    `bf16_bytes` is what the same model would take with every parameter in bf16.
    """
    seen: set[int] = set()
    seen_storage: set = set()
    out = {"total_bytes": 0, "quantized_bytes": 0, "quantized_params": 0, "plain_bytes": 0, "bf16_bytes": 0}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        stored = tensor.numel() * tensor.element_size()
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            numel = 1
            for dim in quant_state.shape:
                numel *= dim
            stored += _quant_state_bytes(quant_state, seen_storage)
            out["quantized_bytes"] += stored
            out["quantized_params"] += numel
            out["bf16_bytes"] += numel * 2
        else:
            out["plain_bytes"] += stored
            out["bf16_bytes"] += tensor.numel() * 2 if tensor.is_floating_point() else stored
        out["total_bytes"] += stored
    return out


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights counted at their original size."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        quant_state = getattr(param, "quant_state", None)
        numel = param.numel()
        if quant_state is not None:
            numel = 1
            for dim in quant_state.shape:
                numel *= dim
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


# ----- memory planner: peak training memory predicted from a model config, before any weights load -----

# Bytes per stored element of the formats the planner knows.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Bits per quantized parameter of bitsandbytes 4-bit (blocksize 64): 4-bit codes + one absmax per block;
# double quant stores the absmax in 8 bits with an fp32 absmax per 256 of them.
QUANT_BITS = {"nf4": 4 + 32 / 64, "fp4": 4 + 32 / 64, "nf4_dq": 4 + 8 / 64 + 32 / (64 * 256),
              "fp4_dq": 4 + 8 / 64 + 32 / (64 * 256)}
# Optimizer state bytes per trainable parameter: AdamW 32-bit keeps two fp32 moments, 8-bit two uint8.
OPTIMIZER_BYTES = {"paged_adamw_32bit": 8, "adamw_torch": 8, "paged_adamw_8bit": 2, "adamw_bnb_8bit": 2,
                   "adafactor": 0}
# Resident memory of a CPU process that has imported torch, transformers, peft, trl, bitsandbytes and
# datasets, before any model loads (measured here: 0.465 GiB peak RSS, torch 2.13 CPU). CUDA's max
# allocated counts tensors only, so it has no such term.
CPU_RUNTIME_BYTES = int(0.465 * GB)
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
BNB_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit")
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingSetup:
    """What the planner needs to know about a training run besides the model's config."""

    method: str = "qlora"  # qlora | lora | full
    lora_r: int = 64
    target_modules: tuple[str, ...] = LORA_TARGETS_ALL  # projection names of a decoder layer
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
    first used (so they count in training, not here). A 4-bit load by the project (model_utils: pread,
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
    return {"parts": parts, "peak_bytes": total, "peak_gb": round(total / GB, 3)}


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
    if setup.optim not in OPTIMIZER_BYTES:
        raise ValueError(f"optim={setup.optim!r} is unknown to the planner; allowed: {', '.join(OPTIMIZER_BYTES)}")
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
                      if setup.device == "cpu" and setup.optim in BNB_OPTIMIZERS else 0)
    head_cast = plain // (2 if counts["lm_head"] else 1) * 2 if setup.embeddings_dtype == "fp32" and setup.method == "qlora" else 0
    parts = {
        "runtime": CPU_RUNTIME_BYTES if setup.device == "cpu" else 0,
        "weights": int(weights),
        "adapters": int(adapters),
        "gradients": int(trainable * trainable_bytes),
        "optimizer": int(trainable * OPTIMIZER_BYTES[setup.optim]),
        "activations": int(activations),
        "logits": int(logits),
        "head_cast": int(head_cast),  # bf16 copy of an fp32 head made by autocast and kept for backward
        "checkpoint_pages": 2 * counts["linear"] if cpu_mapped else 0,  # read while quantizing, still mapped
        "optimizer_step": optimizer_step,  # fp32 working copies of one parameter (CPU bitsandbytes)
    }
    if setup.device != "cpu" and setup.optim.startswith("paged_"):
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
            "peak_bytes": total, "peak_gb": round(total / GB, 3), "trainable_params": trainable, "params": counts}


def plan_for_train_config(model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], device: str) -> dict[str, Any]:
    """The planner applied to 01_Train.py's resolved constants; `{"peak_gb": None, "reason": ...}` when
    the run has something the planner does not model (its prediction is then simply absent)."""
    targets = tuple(str(t).rsplit(".", 1)[-1] for t in train_cfg["target_modules"])
    method = "qlora" if str(train_cfg["QUANT_METHOD"]).upper() == "QLORA" else (
        "full" if train_cfg["PEFT_CONFIG"] == "Full" else "lora")
    setup = TrainingSetup(
        method=method, lora_r=train_cfg["lora_r"], target_modules=targets, seq_len=train_cfg["max_seq_length"],
        batch_size=train_cfg["per_device_train_batch_size"], gradient_checkpointing=train_cfg["gradient_checkpointing"],
        optim=train_cfg["optim"], device=device,
        # model_utils.load_causal_lm reads with pread, except a model with its own code: from_pretrained maps it
        checkpoint_mapped=bool(train_cfg.get("trust_remote_code", False)))
    try:
        plan = {"setup": setup.__dict__ | {"target_modules": list(targets)}, **plan_training_memory(model_cfg, setup)}
    except (KeyError, ValueError) as err:
        return {"peak_gb": None, "reason": str(err)}
    if train_cfg["merge_after_train"] and method != "full":
        # The merge replaces layers one at a time: at its end the whole model is bf16, beside the adapters.
        merge_peak = plan["parts"]["runtime"] + 2 * sum(plan["params"].values()) + plan["parts"]["adapters"]
        if device != "cpu":  # measured on an H200: the 4-bit base was still allocated at the merge's peak
            merge_peak += plan["parts"]["weights"]
        plan["merge_peak_bytes"] = merge_peak
        if merge_peak > plan["peak_bytes"]:
            plan.update(peak_bytes=merge_peak, peak_gb=round(merge_peak / GB, 3), peak_phase="merge")
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
        out.update(peak_bytes=merge_peak, peak_gb=round(merge_peak / GB, 3), peak_phase="merge")
    return out


def format_plan(plan: Mapping[str, Any]) -> str:
    """One line: the predicted peak and its parts in GiB."""
    if plan.get("peak_gb") is None:
        return f"memory not predicted: {plan.get('reason')}"
    parts = ", ".join(f"{name} {value / GB:.2f}" for name, value in plan["parts"].items() if value)
    where = "peak RSS" if plan["setup"]["device"] == "cpu" else "max allocated"
    return (f"predicted {where} {plan['peak_gb']:.2f} GiB ({plan['peak_phase']}): training "
            f"{plan['train_peak_bytes'] / GB:.2f} = {parts}; loading {plan['load_peak_bytes'] / GB:.2f}"
            + (f"; merge {plan['merge_peak_bytes'] / GB:.2f}" if "merge_peak_bytes" in plan else "")
            + (" + the merge check's logits (added once its rows are tokenized)"
               if "merge_peak_bytes" in plan and "merge_check_logits_bytes" not in plan else ""))


def with_measured_peak(plan: Mapping[str, Any], peak: Mapping[str, Any]) -> dict[str, Any]:
    """The plan with the measured peak (max allocated on CUDA, else peak RSS) and the planner's relative error."""
    measured = peak["overall_max_allocated_gb"] if peak["device"] == "cuda" else peak["peak_rss_gb"]
    out = dict(plan, measured_gb=measured)
    if plan.get("peak_gb") is not None and measured:
        out["relative_error"] = round((plan["peak_gb"] - measured) / measured, 4)
    return out
