"""Memory measured: peak GPU memory per device (or peak RSS without CUDA), and the bytes a model's
weights really take, counting bitsandbytes' quantization state (absmax, nested double-quant state)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any


GIB = 1024**3
MIB = 1024**2

def format_size(n_bytes: float) -> str:
    """'7.0 MiB' below 1 GiB, '1.23 GiB' from there: small sizes stay readable."""
    return f"{n_bytes / MIB:.1f} MiB" if n_bytes < GIB else f"{n_bytes / GIB:.2f} GiB"

def proc_status_bytes(field: str) -> int | None:
    """A memory field of Linux's /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in bytes; None elsewhere."""
    status = Path("/proc/self/status")
    for line in (status.read_text().splitlines() if status.exists() else []):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

def available_memory(device: str) -> tuple[int | None, str]:
    """Memory a run can still take, in bytes, and where the figure comes from: on CUDA the free memory of the
    tightest visible GPU (torch.cuda.mem_get_info), else the host's MemAvailable (/proc/meminfo); None where
    neither can be read."""
    if device.startswith("cuda"):
        import torch

        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        gpu = min(free, key=free.get)
        return free[gpu], f"free on cuda:{gpu}"
    meminfo = Path("/proc/meminfo")
    for line in (meminfo.read_text().splitlines() if meminfo.exists() else []):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "MemAvailable of this host"
    return None, "no /proc/meminfo"

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

def peak_memory_report(devices: list[int] | None = None) -> dict[str, Any]:
    """Peak memory since process start (or the last reset), in GiB.

    With CUDA: max reserved/allocated over `devices` (default: every visible GPU) plus one entry per
    GPU. Without CUDA the GPU fields are None, `device` says "cpu", and `peak_rss_gib` (always present)
    is the measure to read.
    """
    import torch

    report: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "overall_max_reserved_gib": None,
        "overall_max_allocated_gib": None,
        "per_gpu": [],
        "peak_rss_gib": round(peak_rss_bytes() / GIB, 3),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()) if devices is None else devices:
            report["per_gpu"].append({
                "gpu": i,
                "name": torch.cuda.get_device_name(i),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(i) / GIB, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(i) / GIB, 3),
            })
        report["overall_max_reserved_gib"] = max(g["peak_reserved_gib"] for g in report["per_gpu"])
        report["overall_max_allocated_gib"] = max(g["peak_allocated_gib"] for g in report["per_gpu"])
    return report

def describe_footprint(footprint: dict[str, int]) -> str:
    """A `weight_footprint` in words: the stored size against the same model in bf16 (a 4-bit model is smaller,
    fp32 master weights are twice it; a bf16 model's few fp32 buffers round to "as bf16")."""
    ratio = footprint["total_bytes"] / footprint["bf16_bytes"]
    versus = (f"{100 * (1 - ratio):.1f}% less than bf16" if ratio < 0.995 else
              f"{ratio:.2f}x bf16" if ratio > 1.005 else "as bf16")
    return f"weights {format_size(footprint['total_bytes'])} ({versus})"


def describe_peak(report: dict[str, Any]) -> str:
    """A `peak_memory_report` in words: CUDA allocated/reserved when there is CUDA, else peak RSS."""
    if report["device"] == "cuda":
        return (f"{report['overall_max_allocated_gib']} GiB allocated / {report['overall_max_reserved_gib']} GiB "
                "reserved (CUDA)")
    return f"{report['peak_rss_gib']} GiB peak RSS (no CUDA)"

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
            numel = logical_numel(tensor)
            stored += _quant_state_bytes(quant_state, seen_storage)
            out["quantized_bytes"] += stored
            out["quantized_params"] += numel
            out["bf16_bytes"] += numel * 2
        else:
            out["plain_bytes"] += stored
            out["bf16_bytes"] += tensor.numel() * 2 if tensor.is_floating_point() else stored
        out["total_bytes"] += stored
    return out

def logical_numel(tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight counts at its original (unpacked) shape."""
    import math

    quant_state = getattr(tensor, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else tensor.numel()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights counted at their original size."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        numel = logical_numel(param)
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total
