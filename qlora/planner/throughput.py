"""Training speed in hardware terms: the model FLOPs of a training step, the GPU's bf16 peak, and the
model FLOPs utilization (MFU) a measured step time gives. Pure: `tools/benchmark.py` feeds it the row
lengths of each measured step and the step's wall time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from qlora.planner.memory import _linear_shapes as linear_shapes


# Dense bf16 tensor-core peak in TFLOP/s, by the name torch.cuda.get_device_name reports; the first
# pattern contained in the name wins, so variants come before their family. NVIDIA's datasheets give
# bf16 "with sparsity" (2:4 structured sparsity doubles the rate); dense is half that figure.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835.5, "NVIDIA H200 datasheet: BF16 Tensor Core 1,671 TFLOPS with sparsity (H200 NVL)"),
    ("H200", 989.5, "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (H200 SXM)"),
    ("H100 NVL", 835.5, "NVIDIA H100 datasheet: BF16 Tensor Core 1,671 TFLOPS with sparsity (H100 NVL)"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet: BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    ("H100", 989.5, "NVIDIA H100 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (H100 SXM)"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)"),
)


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The datasheet's dense bf16 peak of a GPU named like torch.cuda.get_device_name(); None when unknown
    (or on CPU), so that no utilization is printed against a guessed peak."""
    for pattern, tflops, _source in PEAK_BF16_TFLOPS:
        if device_name and pattern in device_name:
            return tflops
    return None


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one optimizer step, by phase."""

    forward: int
    backward: int
    recompute: int  # the decoder layers' forward again, in backward, under gradient checkpointing
    tokens: int

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute


def matmul_parameters(cfg: Mapping[str, Any], lora_r: int | None, targets: Iterable[str]) -> dict[str, int]:
    """Weights that multiply every token: the decoder's projections, the LM head (vocab x hidden, tied or
    not: the head's matmul runs either way) and the LoRA factors (r x in + out x r per adapted projection)."""
    shapes, layers = linear_shapes(cfg), cfg["num_hidden_layers"]
    return {
        "decoder": layers * sum(i * o for i, o in shapes.values()),
        "head": cfg["vocab_size"] * cfg["hidden_size"],
        "lora": layers * sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in targets) if lora_r else 0,
    }


def causal_attention_flops(cfg: Mapping[str, Any], length: int) -> int:
    """Forward FLOPs of attention's two matmuls for one row of `length` tokens, all layers: with a causal
    mask query t meets t keys, so QK^T costs 2 * d_head * heads * (1 + 2 + ... + n) = heads * d_head * n(n+1),
    and the weighted sum of V the same."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return cfg["num_hidden_layers"] * 2 * heads * head_dim * length * (length + 1)


def training_flops(cfg: Mapping[str, Any], row_lengths: Iterable[int], lora_r: int | None,
                   targets: Iterable[str], gradient_checkpointing: bool, full: bool = False) -> StepFlops:
    """Model FLOPs of a training step over rows of `row_lengths` tokens (each row attends only to itself:
    padded, padding-free and packed batches alike). `full`: every weight trains (no LoRA).

    A matmul of a token by a weight W (in x out) costs 2 * in * out FLOPs (a multiply and an add). With
    P = the decoder's projection weights, H = the head (vocab x hidden), A = the LoRA factors and n tokens:
      forward:   2n(P + H + A) + attention (causal_attention_flops)
      backward:  the gradient w.r.t. each matmul's input, 2n(P + H + A), for every layer (the inputs need
                 it: k-bit preparation makes the embedding output require grad); the gradient w.r.t. the
                 weights only where they train: 2nA for LoRA (2n(P + H) more for full fine-tuning); and
                 attention's backward, four matmuls the size of its forward two (dV = P^T dO, dP = dO V^T,
                 dQ = dS K, dK = dS^T Q): twice the forward attention
      recompute: with gradient checkpointing each decoder layer runs its forward again in backward:
                 2n(P + A) + attention; the head sits outside the checkpointed layers
    So a LoRA step with checkpointing costs n(6P + 4H + 8A) + 4 * attention: 6 FLOPs per frozen weight
    per token, like full training without checkpointing, because the recompute stands in for the weight
    gradients that frozen weights skip. Not counted: embedding lookups, norms, activations, rotary,
    softmax and the loss (O(hidden) per token, under 1% here), and recomputes a kernel chooses on its own
    (TRL's chunked LM head, flash attention's backward): utilization is measured against the model's work.
    torch's checkpoint skips re-running a layer's last matmul (down_proj's LoRA B; nothing saves its
    output): 2nr x hidden per layer, about 0.3% of a step at r=256 on Qwen3-0.6B, counted all the same.
    """
    params = matmul_parameters(cfg, lora_r, [] if full else targets)
    lengths = list(row_lengths)
    n = sum(lengths)
    attention = sum(causal_attention_flops(cfg, length) for length in lengths)
    matmuls = 2 * n * (params["decoder"] + params["head"] + params["lora"])
    weight_grads = 2 * n * (params["decoder"] + params["head"] if full else params["lora"])
    recompute = 2 * n * (params["decoder"] + params["lora"]) + attention if gradient_checkpointing else 0
    return StepFlops(forward=matmuls + attention, backward=matmuls + weight_grads + 2 * attention,
                     recompute=recompute, tokens=n)


def model_flops_utilization(flops: int, seconds: float, device_name: str | None) -> float | None:
    """Achieved FLOP/s over the device's dense bf16 peak; None where the peak is unknown (CPU, other GPUs)."""
    peak = peak_bf16_tflops(device_name)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)
