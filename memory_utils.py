"""Memory measured: peak GPU memory per device (or peak RSS without CUDA), and the bytes a model's
weights really take, counting bitsandbytes' quantization state (absmax, nested double-quant state)."""

from __future__ import annotations

import resource
import sys
from typing import Any

GB = 1024**3


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


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


def _quant_state_bytes(quant_state) -> int:
    """Bytes of a bitsandbytes QuantState: absmax (+ nested absmax and code with double quant)."""
    if quant_state is None:
        return 0
    total = quant_state.absmax.numel() * quant_state.absmax.element_size()
    total += quant_state.code.numel() * quant_state.code.element_size() if quant_state.code is not None else 0
    if getattr(quant_state, "nested", False):
        total += _quant_state_bytes(quant_state.state2)
        total += quant_state.offset.numel() * quant_state.offset.element_size()
    return total


def weight_footprint(model) -> dict[str, int]:
    """Stored bytes of a model's parameters and buffers, split into quantized and plain weights.

    `quantized_params` counts the original (unpacked) number of quantized parameters, so
    `quantized_bytes * 8 / quantized_params` is the real bits per quantized parameter.
    `bf16_bytes` is what the same model would take with every parameter in bf16.
    """
    seen: set[int] = set()
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
            stored += _quant_state_bytes(quant_state)
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
