"""Memory and disk planned before anything loads: the peak a training run, its loading and its merge
will reach, predicted from the model's config.json alone (the disk it writes: qlora/planner/disk.py).
Every figure here is a formula over the config; `tools/benchmark.py` measures the same cases and
prints the planner's error beside each measurement.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from qlora.checks.generation import MIN_NEW_TOKENS
from qlora.checks.logits import MERGE_CHECK_ROWS, comparison_bytes
from qlora.core.errors import ConfigError, UserError
from qlora.core.files import existing_ancestor
from qlora.core.logs import step
from qlora.core.memory import GIB, available_memory, format_size, proc_status_bytes
from qlora.data.chat_format import example_token_ids
from qlora.planner.disk import disk_needed_for_config
from qlora.train.options import OPTIMIZERS
from qlora.train.peft import DEFAULT_TARGET_MODULES, PeftKind
from quantization_utils import QuantMethod


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
# TRL's chunked log-prob on a device without Triton (trl/kernels/chunked_logprob.py) works on (tokens, 32768)
# tiles with torch ops. Its backward's peak line (`_backward_tile`, the log-prob gradient) holds seven fp32
# tiles (the upcast logits y, z, log p, p, the zeroed gradient, target mask - p, its product with the
# incoming gradient), the bool target mask (a quarter of a tile) and the bf16 product buffer (a half): 7.75.
# The forward's is_top1 statistic leaves its two bool tiles (half a tile) in the heap. Measured: 8.5 tiles
# of peak RSS over the step's start, for 256 to 511 tokens and hidden sizes 640 and 1024.
TRL_VOCAB_CHUNK = 32768
CPU_LOSS_TILES = 7.75 + 0.5
# glibc serves a block of up to 32 MiB (its largest dynamic mmap threshold) from the heap, and a freed heap
# block stays in the process. A tile under that size (fewer than 256 tokens) stays resident after the tile
# loop, under the backward's next allocations: the fp32 copies `acc.addmm_(tile.float(), w_chunk.float())`
# makes of one tile and of one (32768, hidden) chunk of the head.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024**2
# TRL's SFTTrainer tokenizes each row whole (chat template, token ids, completion mask and labels as Python
# lists, then Arrow) before it truncates to max_seq_length: bytes of peak RSS per token of the longest row,
# measured on CPU (tools/benchmark.py --cases tokenize_long_row; docs/measurements.md, "Long rows").
TOKENIZE_BYTES_PER_TOKEN = 638
# bitsandbytes' optimizers on CPU (backends/cpu/ops.py) update one parameter at a time through fp32
# copies: for 8-bit AdamW the two dequantized states, the gradient, the parameter, sqrt(state2) and the
# denominator. Six fp32 copies of the largest trainable tensor: 3.5 GiB for full fine-tuning of
# Qwen3-0.6B (its 155.6M-parameter embedding), a few MB for LoRA. An fp32 parameter is updated in place
# (`p.data.float()` copies only a 16-bit one): five. On CUDA the kernels update in place.
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
    full_weights_dtype: str = "bf16"  # full only: bf16 | fp32 (master weights; their gradients fp32 too)
    embeddings_dtype: str = "bf16"  # qlora: bf16 (prepare_kbit_model) | fp32 (peft's upcast kept)
    norms_dtype: str = "bf16"  # bf16 (prepare_kbit_model, TRL's recipe) | fp32 (peft's upcast kept)
    device: str = "cpu"  # cpu (peak RSS, with the runtime term) | cuda (max allocated)
    checkpoint_mapped: bool = False  # plain from_pretrained (TRL's recipe): the bf16 checkpoint stays memory-mapped
    longest_row_tokens: int = 0  # the longest training row's tokens before truncation (0: not known)
    # CPU: the process's resident memory before the model loads; the training script measures its own at the plan
    # step (its tokenizer and data are in it), a plan made from a config alone takes the stack's import
    runtime_bytes: int = CPU_RUNTIME_BYTES

# RMSNorms of one decoder layer by model_type: (over hidden_size, over head_dim as q_norm + k_norm).
# Gemma 2/3 normalise before and after attention and the MLP; Qwen3 and Gemma 3 normalise q and k per head.
LAYER_NORMS = {"qwen3": (2, 2), "gemma3_text": (4, 2), "gemma3": (4, 2), "gemma2": (4, 0), "llama": (2, 0),
               "mistral": (2, 0), "qwen2": (2, 0), "gemma": (2, 0), "phi3": (2, 0)}
DEFAULT_MODEL_TYPE = "qwen3"  # a config without model_type (the project's own tiny test dimensions)

def layer_norms(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(hidden-size norms, head-dim norms) of one decoder layer; Llama's two for a model_type not listed."""
    return LAYER_NORMS.get(cfg.get("model_type", DEFAULT_MODEL_TYPE), (2, 0))

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
        "norms": layers * (layer_norms(cfg)[0] * h + layer_norms(cfg)[1] * head_dim) + h,
    }

def lora_parameter_count(cfg: Mapping[str, Any], rank: int, targets: tuple[str, ...]) -> int:
    shapes = _linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"planner knows the projections {', '.join(shapes)}; got {', '.join(unknown)}")
    return cfg["num_hidden_layers"] * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

def layer_activation_bytes(cfg: Mapping[str, Any], tokens: int, lora_targets: tuple[str, ...]) -> int:
    """Bytes one decoder layer keeps for backward, under bf16 autocast: bf16 inputs of every projection,
    fp32 copies inside the RMSNorms (hidden and q/k head norms, as many as the architecture has), rotary
    q/k, attention q/k/v/out, the gated MLP's gate/up/product (SwiGLU or Gemma's tanh-GELU: one saved input
    either way), and for each LoRA-wrapped projection its dropout output and mask."""
    shapes = _linear_shapes(cfg)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    hidden_norms, head_norms = layer_norms(cfg)
    per_token = (
        hidden_norms * 10 * h  # each RMSNorm: fp32 input, fp32 normalised copy, bf16 output
        + (10 * (q + kv) if head_norms else 0)  # q_norm / k_norm, same pattern per head
        + 2 * (h + q + h + inter)  # bf16 inputs of q/k/v (shared), o, gate/up (shared), down
        + 2 * (q + kv)  # rotary outputs
        + 2 * (2 * q + 2 * kv)  # attention: q, k, v saved, output
        + 2 * 3 * inter  # SwiGLU: gate, up, silu(gate)
        + sum(3 * shapes[t][0] for t in lora_targets)  # LoRA dropout: bf16 output + bool mask per module
    )
    return tokens * per_token

def plan_load_memory(cfg: Mapping[str, Any], quant: str | None, device: str = "cpu",
                     checkpoint_mapped: bool = False, dtype: str = "bf16",
                     runtime_bytes: int = CPU_RUNTIME_BYTES) -> dict[str, Any]:
    """Predicted peak while loading a bf16 checkpoint as `dtype` (bf16, or fp32 for full fine-tuning's master
    weights; `quant` None) or 4-bit, before training.

    On CPU: the runtime, the converted weights (embedding, head and norms in bf16) and the bf16 tensor
    being quantized. A bf16 load maps the checkpoint and its weights are the mapped pages, read only when
    first used (so they count in training, not here). A 4-bit load by the project (qlora.model.loading: pread,
    freed buffers leave the heap) holds one tensor at a time, twice while it is read: with a large
    vocabulary the peak is the embedding's read; one by plain from_pretrained (`checkpoint_mapped`) keeps
    every page it read mapped: the bf16 bytes of all quantized weights.
    """
    if quant is not None and quant not in QUANT_BITS:
        raise ValueError(f"quant={quant!r} is unknown; allowed: {', '.join(QUANT_BITS)}")
    counts = parameter_counts(cfg)
    bits = 16 if quant is None else QUANT_BITS[quant]
    weights = counts["linear"] * bits / 8 + 2 * (counts["embedding"] + counts["lm_head"] + counts["norms"])
    cpu = device == "cpu"
    if quant is None and dtype != "bf16":  # converted on load: allocated, on CPU too
        parts = {"runtime": runtime_bytes if cpu else 0, "weights": DTYPE_BYTES[dtype] * sum(counts.values())}
        total = sum(parts.values())
    elif quant is None:  # on CPU the weights are the mapped checkpoint, not yet read
        parts = {"runtime": runtime_bytes if cpu else 0, "weights": 0 if cpu else int(weights)}
        total = sum(parts.values())
    elif checkpoint_mapped:
        largest = max(i * o for i, o in _linear_shapes(cfg).values())
        parts = {"runtime": runtime_bytes if cpu else 0, "weights": int(weights),
                 "checkpoint_pages": 2 * counts["linear"] if cpu else 0,
                 "transient": 2 * largest}  # the bf16 tensor being quantized
        total = sum(parts.values())
    else:
        # safetensors' pread backend holds each tensor twice while it reads it (its read buffer and the tensor:
        # 0.627 GiB of peak RSS for a 0.3125 GiB embedding). Checkpoints list tensors by name: the head
        # (lm_head), then the embedding (model.embed_tokens), before the layers; a 4-bit layer's bf16 tensor
        # is read twice, then quantized.
        largest = max(i * o for i, o in _linear_shapes(cfg).values())
        head, embedding = 2 * counts["lm_head"], 2 * counts["embedding"]
        parts = {"runtime": runtime_bytes if cpu else 0, "weights": int(weights), "transient": 2 * 2 * largest}
        total = max(sum(parts.values()), parts["runtime"] + head + 2 * embedding, parts["runtime"] + 2 * head)
        parts["embedding_read"] = max(0, total - sum(parts.values()))  # while the head and embedding are read
    return {"parts": parts, "peak_bytes": total, "peak_gib": round(total / GIB, 3)}

def _loading_peak(cfg: Mapping[str, Any], setup: TrainingSetup, counts: dict[str, int]) -> tuple[dict[str, Any], int]:
    """`plan_load_memory` for the setup, and the loading phase's peak including k-bit preparation."""
    # Loading comes before kbit preparation: the weights are as loaded (see plan_load_memory).
    load = plan_load_memory(cfg, setup.quant if setup.method == "qlora" else None, setup.device,
                            setup.checkpoint_mapped, setup.full_weights_dtype if setup.method == "full" else "bf16",
                            setup.runtime_bytes)
    if setup.method != "qlora" or setup.embeddings_dtype != "fp32":
        return load, load["peak_bytes"]  # prepare_kbit_model makes no fp32 copy (qlora.model.loading)
    # peft's prepare_model_for_kbit_training (embeddings_dtype fp32): every 16-bit parameter replaced by an fp32
    # copy, one at a time, beside the 4-bit layers
    plain_params = counts["embedding"] + counts["lm_head"] + counts["norms"]
    return load, max(load["peak_bytes"], load["parts"]["runtime"] + int(counts["linear"] * QUANT_BITS[setup.quant] / 8)
                     + load["parts"].get("checkpoint_pages", 0) + 4 * plain_params + 2 * counts["embedding"])


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
        trainable, trainable_bytes = sum(counts.values()), DTYPE_BYTES[setup.full_weights_dtype]
        weights = trainable * trainable_bytes
    adapters = trainable * trainable_bytes if setup.method != "full" else 0
    targets = setup.target_modules if setup.method != "full" else ()
    one_layer = layer_activation_bytes(cfg, tokens, targets)
    if setup.gradient_checkpointing:
        activations = layers * tokens * h * 2 + one_layer  # each layer's bf16 input, plus one layer recomputed
    else:
        activations = layers * one_layer
    logits = loss_bytes(cfg, setup)
    cpu_mapped = setup.device == "cpu" and setup.checkpoint_mapped and setup.method == "qlora"
    if setup.method == "full":
        largest_trainable = max([vocab * h] + [i * o for i, o in _linear_shapes(cfg).values()])
    else:
        largest_trainable = setup.lora_r * max(max(i, o) for i, o in _linear_shapes(cfg).values())  # A or B
    step_copies = CPU_BNB_OPTIMIZER_COPIES - 1 if trainable_bytes == 4 else CPU_BNB_OPTIMIZER_COPIES
    optimizer_step = (step_copies * 4 * largest_trainable
                      if setup.device == "cpu" and OPTIMIZERS[setup.optim].bitsandbytes else 0)
    head_cast = plain // (2 if counts["lm_head"] else 1) * 2 if setup.embeddings_dtype == "fp32" and setup.method == "qlora" else 0
    parts = {
        "runtime": setup.runtime_bytes if setup.device == "cpu" else 0,
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
    load, load_peak = _loading_peak(cfg, setup, counts)
    # TRL tokenizes every row at its full length before it truncates to max_seq_length (the model loaded)
    data_peak = (load["parts"]["runtime"] + parts["weights"] + parts["adapters"] + parts["checkpoint_pages"]
                 + TOKENIZE_BYTES_PER_TOKEN * setup.longest_row_tokens) if setup.longest_row_tokens else 0
    phases = {"training": train_peak, "loading": load_peak, "data": data_peak}
    phase = max(phases, key=phases.get)
    total = phases[phase]
    return {"parts": parts, "train_peak_bytes": train_peak, "load_peak_bytes": load_peak,
            **({"data_peak_bytes": data_peak} if data_peak else {}), "peak_phase": phase,
            "peak_bytes": total, "peak_gib": round(total / GIB, 3), "trainable_params": trainable, "params": counts}

def loss_bytes(cfg: Mapping[str, Any], setup: TrainingSetup) -> int:
    """Memory of the LM head's loss. Full logits (TRL's chunked loss off): bf16 from the head, fp32 upcast,
    fp32 log-softmax and its fp32 gradient. TRL's chunked loss: nothing on CUDA (a Triton kernel folds each
    tile in place); fp32 tiles of (tokens, 32768) on CPU (CPU_LOSS_TILES), plus, when a tile is small
    enough for the heap, the fp32 copies of one tile and one head chunk made while the tiles stay resident."""
    vocab, h = cfg["vocab_size"], cfg["hidden_size"]
    if not setup.fused_loss:
        return setup.batch_size * setup.seq_len * vocab * (2 + 4 + 4 + 4)
    if setup.device != "cpu":
        return 0
    tokens = setup.batch_size * max(setup.seq_len - 1, 1)  # TRL scores every position but the last
    tile = tokens * min(vocab, TRL_VOCAB_CHUNK) * 4
    heap_kept = tile + min(vocab, TRL_VOCAB_CHUNK) * h * 4 if tile < GLIBC_MMAP_THRESHOLD_MAX else 0
    return int(CPU_LOSS_TILES * tile + heap_kept)

@dataclass(frozen=True)
class TokenStats:
    """Token lengths of a run's rows as SFTTrainer will see them, before truncation; from a sample."""

    rows: int  # training rows
    sampled: int  # training rows tokenized
    mean_tokens: float  # over the sampled rows
    longest_tokens: int  # the longest training row: tokenized, or estimated from its characters
    longest_chars: int
    estimated: bool  # longest_tokens estimated (the row was too long to tokenize for a plan)
    held_out_tokens: tuple[int, ...] = ()  # the merge check's held-out rows

    def describe(self, seq_len: int) -> str:
        longest = f"{self.longest_tokens:,} ({'estimated from its ' if self.estimated else ''}" \
                  f"{self.longest_chars:,} characters)"
        return (f"{self.rows} training rows, {self.sampled} tokenized: mean {self.mean_tokens:.0f} tokens, longest "
                f"{longest}; batches of up to {min(seq_len, self.longest_tokens)} tokens per row")

# Rows tokenized for a plan: a seeded sample, plus the longest rows up to this many characters each;
# a longer row's tokens are estimated from its characters at the densest tokens-per-character seen.
PLAN_SAMPLE_ROWS = 256
PLAN_LONGEST_ROWS = 8
PLAN_MAX_TOKENIZED_CHARS = 200_000

def row_text_chars(row: Mapping[str, Any]) -> int:
    """Characters of a trainer row's text: a `text` column, or the contents of its messages."""
    if "text" in row:
        return len(row["text"] or "")
    messages = row.get("messages") or list(row.get("prompt") or []) + list(row.get("completion") or [])
    return sum(len(str(m.get("content") or "")) for m in messages)

def tokens_of_row(tokenizer, row: Mapping[str, Any]) -> int:
    """Tokens of a trainer row before truncation, as SFTTrainer builds them (chat_format.example_token_ids)."""

    return len(example_token_ids(tokenizer, row))

def token_stats(data, tokenizer, seed: int = 0) -> TokenStats:
    """Token lengths of `data` (qlora.data.formats.TrainingData) for the plan, without tokenizing every row: a seeded
    sample and the longest rows (by characters) are tokenized, and the merge check's held-out rows."""
    import random

    chars = [row_text_chars(row) for row in data.train]
    if not chars:
        return TokenStats(0, 0, 0.0, 0, 0, False)
    order = sorted(range(len(chars)), key=chars.__getitem__, reverse=True)
    longest = [i for i in order if chars[i] <= PLAN_MAX_TOKENIZED_CHARS][:PLAN_LONGEST_ROWS]
    sample = random.Random(seed).sample(range(len(chars)), min(PLAN_SAMPLE_ROWS, len(chars)))
    counted = {i: tokens_of_row(tokenizer, data.train[i]) for i in set(sample) | set(longest)}
    density = max(counted[i] / max(chars[i], 1) for i in counted)
    estimated = chars[order[0]] > PLAN_MAX_TOKENIZED_CHARS
    top = int(chars[order[0]] * density) + 1 if estimated else max(counted.values())
    held_out = tuple(tokens_of_row(tokenizer, data.held_out[i]) for i in range(min(MERGE_CHECK_ROWS, len(data.held_out))))
    return TokenStats(len(chars), len(counted), sum(counted[i] for i in sample) / len(sample), top, chars[order[0]],
                      estimated, held_out)

def plan_for_train_config(model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], device: str,
                          tokens: TokenStats | None = None, runtime_bytes: int = CPU_RUNTIME_BYTES) -> dict[str, Any]:
    """The planner applied to 01_Train.py's resolved constants; `{"peak_gib": None, "reason": ...}` when
    the run has something the planner does not model (its prediction is then simply absent). With `tokens`,
    batches are as long as the longest row allows (up to max_seq_length), the tokenization of the longest
    row is a phase of its own, and the merge check's logits count from the held-out rows."""
    targets = tuple(str(t).rsplit(".", 1)[-1] for t in train_cfg["target_modules"])
    method = "qlora" if train_cfg["QUANT_METHOD"] == QuantMethod.QLORA else (
        "full" if train_cfg["PEFT_CONFIG"] == PeftKind.FULL else "lora")
    seq = train_cfg["max_seq_length"] if tokens is None else max(1, min(train_cfg["max_seq_length"], tokens.longest_tokens))
    setup = TrainingSetup(
        method=method, lora_r=train_cfg["lora_r"], target_modules=targets, seq_len=seq,
        batch_size=train_cfg["per_device_train_batch_size"], gradient_checkpointing=train_cfg["gradient_checkpointing"],
        optim=train_cfg["optim"], device=device, full_weights_dtype=train_cfg["full_weights_dtype"],
        # qlora.model.loading.load_causal_lm reads with pread, except a model with its own code: from_pretrained maps it
        checkpoint_mapped=bool(train_cfg.get("trust_remote_code", False)),
        longest_row_tokens=tokens.longest_tokens if tokens else 0, runtime_bytes=runtime_bytes)
    try:
        plan = {"setup": setup.__dict__ | {"target_modules": list(targets)}, **plan_training_memory(model_cfg, setup)}
    except (KeyError, ValueError) as err:
        return {"peak_gib": None, "reason": str(err)}
    plan = settle_peak(dict(plan, generation_peak_bytes=generation_bytes(model_cfg, plan, setup)))
    if train_cfg["merge_after_train"] and method != "full":
        plan = settle_peak({**plan, "merge_peak_bytes": streamed_merge_bytes(model_cfg, plan)})
        # the check's rows as tokenized; from a config alone, MERGE_CHECK_ROWS rows of max_seq_length (the most)
        rows = tokens.held_out_tokens if tokens is not None else (train_cfg["max_seq_length"],) * MERGE_CHECK_ROWS
        plan = with_merge_check(plan, [min(t, train_cfg["max_seq_length"]) for t in rows], model_cfg["vocab_size"],
                                device)
    return plan

def _trained_model_bytes(plan: Mapping[str, Any]) -> int:
    """The trained model as it stays after training: runtime, weights and adapters."""
    return plan["parts"]["runtime"] + plan["parts"]["weights"] + plan["parts"]["adapters"]

# Working copies of one layer in the streamed merge (qlora.merge.weights.write_merged): its fp32 W, the fp32 delta
# B @ A added to it, and the merged weight in bf16 on its way to the file.
MERGE_LAYER_BYTES_PER_PARAM = 4 + 4 + 2

def streamed_merge_bytes(cfg: Mapping[str, Any], plan: Mapping[str, Any]) -> int:
    """The streamed merge's peak: the trained model as it stays, plus one layer's working copies."""
    largest = max(i * o for i, o in _linear_shapes(cfg).values())
    return _trained_model_bytes(plan) + MERGE_LAYER_BYTES_PER_PARAM * largest

def generation_bytes(cfg: Mapping[str, Any], plan: Mapping[str, Any], setup: TrainingSetup) -> int:
    """The generation check on the trained model (qlora.checks.generation), prompts as many at a time as a training
    batch has rows: the model as it stays, the KV cache over the prompts and their new tokens, one layer's widest
    activations over the prompts in the prefill, and the last positions' fp32 logits."""
    tokens = setup.batch_size * (setup.seq_len + MIN_NEW_TOKENS)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_cache = 2 * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * tokens
    prefill = 2 * setup.batch_size * setup.seq_len * (4 * cfg["hidden_size"] + 3 * cfg["intermediate_size"])
    return _trained_model_bytes(plan) + kv_cache + prefill + 4 * 2 * setup.batch_size * cfg["vocab_size"]

def with_merge_check(plan: Mapping[str, Any], row_tokens: list[int], vocab_size: int, device: str) -> dict[str, Any]:
    """The plan with the merge check, once its rows are tokenized (before the merge runs): the trained model's
    logits of each row are taken (and its rounding floor measured) beside the trained model, and written to
    files, so the merge holds none; the check phase reloads the merged model within the memory the run has
    already taken (qlora.model.loading.load_merged_dir offloads what does not fit), beside one row's logits and
    their copies (`comparison_bytes` on the host; on CUDA the row's bf16 logits, upcast on the host)."""
    if "merge_peak_bytes" not in plan or not row_tokens:
        return dict(plan)
    row = comparison_bytes(max(row_tokens), vocab_size) if device == "cpu" else 2 * vocab_size * max(row_tokens)
    runtime, merged = plan["parts"]["runtime"], 2 * sum(plan["params"].values())
    before = max(plan[key] for key in ("train_peak_bytes", "load_peak_bytes") if plan.get(key))
    check = min(runtime + merged + row, max(before, runtime + row))
    # the reference rows are taken at the merge's start, beside the trained model and one layer's copies
    merge = plan["merge_peak_bytes"] - plan.get("merge_check_logits_bytes", 0) + row
    return settle_peak(dict(plan, merge_peak_bytes=merge, check_peak_bytes=check, merge_check_logits_bytes=row,
                            merge_check_tokens=sum(row_tokens)))

PHASES = {"loading": "load_peak_bytes", "data": "data_peak_bytes", "training": "train_peak_bytes",
          "generation": "generation_peak_bytes", "merge": "merge_peak_bytes", "check": "check_peak_bytes"}

def settle_peak(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The plan with its peak and peak_phase set to the largest of its phases."""
    phases = {name: plan[key] for name, key in PHASES.items() if plan.get(key)}
    phase = max(phases, key=phases.get)
    return dict(plan, peak_bytes=phases[phase], peak_gib=round(phases[phase] / GIB, 3), peak_phase=phase)

PHASE_WORDS = {"loading": "loading", "data": "tokenizing the longest row", "generation": "generation check",
               "merge": "streamed merge", "check": "merge check"}

def format_plan(plan: Mapping[str, Any]) -> str:
    """One line: the predicted peak, the training phase's parts and every other phase, in GiB."""
    if plan.get("peak_gib") is None:
        return f"memory not predicted: {plan.get('reason')}"
    parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in plan["parts"].items() if value)
    where = "peak RSS" if plan["setup"]["device"] == "cpu" else "max allocated"
    others = "; ".join(f"{PHASE_WORDS[name]} {plan[key] / GIB:.2f}" for name, key in PHASES.items()
                       if name != "training" and plan.get(key))
    pending = (" (+ the merge check's logits, once its rows are tokenized)"
               if "merge_peak_bytes" in plan and "merge_check_logits_bytes" not in plan else "")
    return (f"predicted {where} {plan['peak_gib']:.2f} GiB ({plan['peak_phase']}): training "
            f"{plan['train_peak_bytes'] / GIB:.2f} = {parts}; {others}{pending}")

# ----- will it fit: the budget, the levers, the dry run ------------------------------------------------------

MEMORY_LIMIT_WORDS = ("auto", "off")

def parse_memory_limit(value: Any) -> float | str:
    """memory_limit_gb as 'auto', 'off' or a number of GiB > 0; ConfigError naming what is allowed."""
    import math

    text = str(value).strip().lower()
    if text in MEMORY_LIMIT_WORDS:
        return text
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0) or isinstance(value, bool):
        raise ConfigError(f"memory_limit_gb={value!r} is not auto, off or a number of GiB > 0")
    return gib

def memory_budget(value: Any, device: str) -> tuple[int | None, str]:
    """(bytes the run may use, where that figure comes from); None when memory_limit_gb is off or unreadable."""

    limit = parse_memory_limit(value)
    if limit == "off":
        return None, "memory_limit_gb=off"
    if limit == "auto":
        available, source = available_memory(device)
        return available, f"memory_limit_gb=auto: {source}"
    return int(limit * GIB), f"memory_limit_gb={limit:g}"

def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out

def _smaller_batches(cfg: Mapping[str, Any]) -> list[dict[str, int]]:
    """Smaller per-device batches with the accumulation that keeps the effective batch."""
    batch, steps = cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"]
    return [{"per_device_train_batch_size": b, "gradient_accumulation_steps": steps * batch // b}
            for b in _halvings(batch, 1) if batch % b == 0]

def _switch(name: str, new: Any) -> Callable[[Mapping[str, Any]], list[dict[str, Any]]]:
    return lambda cfg: [{name: new}] if cfg[name] != new else []

# What a run can change to lower its peak, cheapest first: the same training at a small cost in speed, then
# less state, then the work itself (where the peak is, the merge, shorter rows, a smaller adapter). Each yields
# the changed constants to try, best first.
LEVERS: dict[str, Callable[[Mapping[str, Any]], list[dict[str, Any]]]] = {
    "gradient checkpointing": _switch("gradient_checkpointing", True),
    "batch": lambda cfg: _smaller_batches(cfg),
    "8-bit optimizer": lambda cfg: [{"optim": "paged_adamw_8bit"}] if OPTIMIZERS[cfg["optim"]].state_bytes > 2 else [],
    "bf16 weights": lambda cfg: ([{"full_weights_dtype": "bf16"}] if cfg["PEFT_CONFIG"] == PeftKind.FULL
                                 and cfg["full_weights_dtype"] != "bf16" else []),
    "4-bit base": lambda cfg: ([{"QUANT_METHOD": "QLORA"}] if cfg["QUANT_METHOD"] != QuantMethod.QLORA
                               and cfg["PEFT_CONFIG"] != PeftKind.FULL else []),
    "no merge": _switch("merge_after_train", False),
    "shorter rows": lambda cfg: [{"max_seq_length": s} for s in _halvings(cfg["max_seq_length"], 64)],
    "lower rank": lambda cfg: ([{"lora_r": r} for r in _halvings(cfg["lora_r"], 4)] if cfg["PEFT_CONFIG"] != PeftKind.FULL else []),
}

def _describe_change(cfg: Mapping[str, Any], change: Mapping[str, Any]) -> str:
    return " with ".join(f"{name} {cfg[name]}->{value}" for name, value in change.items())

def fitting_levers(model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], device: str, budget: int,
                   tokens: TokenStats | None = None, count: int = 3,
                   runtime_bytes: int = CPU_RUNTIME_BYTES) -> list[tuple[str, int]]:
    """Up to `count` single changes that bring the planned peak under `budget`, cheapest first, each with its
    planned peak in bytes; for a lever with several settings, the gentlest that fits. When no single change
    fits, the changes that lower the peak most, and all of them together as the last entry."""
    fits, lowers, combined = [], [], dict(train_cfg)
    for lever in LEVERS.values():
        tried = [(change, plan_for_train_config(model_cfg, {**train_cfg, **change}, device, tokens, runtime_bytes))
                 for change in lever(train_cfg)]
        tried = [(change, plan["peak_bytes"]) for change, plan in tried if plan.get("peak_gib") is not None]
        fitting = [(change, peak) for change, peak in tried if peak <= budget]
        if fitting:
            fits.append((_describe_change(train_cfg, fitting[0][0]), fitting[0][1]))
        if tried:
            lowest = min(tried, key=lambda item: item[1])
            lowers.append((_describe_change(train_cfg, lowest[0]), lowest[1]))
            combined.update(lowest[0])
    if fits:
        return fits[:count]
    together = plan_for_train_config(model_cfg, combined, device, tokens, runtime_bytes)
    best = sorted(lowers, key=lambda item: item[1])[:count]
    if together.get("peak_gib") is not None and combined != dict(train_cfg):
        best.append((_describe_change(train_cfg, {k: v for k, v in combined.items() if train_cfg[k] != v})
                     + " together", together["peak_bytes"]))
    return best

class MemoryBudgetError(UserError):
    """The planned peak exceeds the memory the run may use."""

def fit_verdict(plan: Mapping[str, Any], model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], device: str,
                tokens: TokenStats | None = None) -> tuple[bool, str]:
    """(fits, one line saying so): the planned peak against memory_limit_gb; when it does not fit, the line
    lists the cheapest changes that would make it fit, each with its planned peak."""
    budget, source = memory_budget(train_cfg["memory_limit_gb"], device)
    if plan.get("peak_gib") is None:
        return True, f"fit not checked: {format_plan(plan)}"
    peak = f"planned peak {plan['peak_bytes'] / GIB:.2f} GiB ({plan['peak_phase']})"
    if budget is None:
        return True, f"{peak}; fit not checked ({source})"
    if plan["peak_bytes"] <= budget:
        return True, f"{peak} fits in {budget / GIB:.2f} GiB ({source})"
    levers = fitting_levers(model_cfg, train_cfg, device, budget, tokens,
                            runtime_bytes=(plan.get("setup") or {}).get("runtime_bytes", CPU_RUNTIME_BYTES))
    fits = [text for text, bytes_ in levers if bytes_ <= budget]
    listed = "; ".join(f"{text}: {bytes_ / GIB:.2f} GiB" for text, bytes_ in levers)
    advice = (f"changes that fit: {listed}" if fits else f"no single change fits; the largest cuts: {listed}")
    return False, (f"{peak} exceeds {budget / GIB:.2f} GiB ({source}); {advice}; "
                   "set memory_limit_gb to a number of GiB, or off, to run anyway")

def plan_run(model_cfg: Mapping[str, Any], cfg: Mapping[str, Any], device: str, data, tokenizer) -> dict[str, Any]:
    """01_Train.py's plan, before any weights load: token lengths of the rows (`data`: qlora.data.formats.TrainingData),
    the planned peak by phase, and the fit check against memory_limit_gb. A run that does not fit raises
    MemoryBudgetError, a dry run (cfg dry_run) logs the plan, the merge and the disk and raises nothing."""

    tokens = token_stats(data, tokenizer, cfg["seed"])
    # what this process holds before any weights load (the stack, the tokenizer, the rows) stays through the run
    plan = plan_for_train_config(model_cfg, cfg, device, tokens, proc_status_bytes("VmRSS") or CPU_RUNTIME_BYTES)
    fits, verdict = fit_verdict(plan, model_cfg, cfg, device, tokens)
    if not cfg["dry_run"]:
        step("plan", "%s", format_plan(plan))
        if not fits:
            raise MemoryBudgetError(verdict)
        step("plan", "%s", verdict)
        return plan
    step("dry run", "data: %s", tokens.describe(cfg["max_seq_length"]))
    step("dry run", "training: %s", format_plan(plan))
    if "merge_peak_bytes" in plan:
        step("dry run", "merge: %.2f GiB (the whole model in bf16 beside the adapters, and the merge check's "
             "logits over %d held-out rows)", plan["merge_peak_bytes"] / GIB, len(tokens.held_out_tokens))
    if plan.get("peak_gib") is not None:
        disk = disk_needed_for_config(plan, cfg)
        free = shutil.disk_usage(existing_ancestor(Path(cfg["OUTPUT_ROOT"]))).free
        step("dry run", "disk: %s per checkpoint x %d, %s adapter, %s merged model: %s in all (%s free under %s)",
             format_size(disk["checkpoint"]), cfg["keep_checkpoints"] + 1, format_size(disk["adapter"]),
             format_size(disk["merged"]), format_size(disk["total"]), format_size(free), cfg["OUTPUT_ROOT"])
    step("dry run", "%s", verdict if fits else f"would refuse: {verdict}")
    step("dry run", "no weights loaded, nothing written; set dry_run=False to train")
    return plan
