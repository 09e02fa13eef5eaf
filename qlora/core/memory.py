"""Memory measured: peak GPU memory per device (or peak RSS without CUDA), and the bytes a model's
weights really take, counting bitsandbytes' quantization state (absmax, nested double-quant state)."""

from __future__ import annotations

import logging
import resource
import sys
import threading
from contextlib import contextmanager
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

def headroom_bytes(device: str) -> int:
    """Memory this process has already shown it can take and does not hold now: the peak so far minus what is in
    use (CUDA: allocated on `device`; CPU: resident). A later phase that stays within it never sets a new peak."""
    if device.startswith("cuda"):
        import torch

        return max(torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device), 0)
    return max(peak_rss_bytes() - (proc_status_bytes("VmRSS") or 0), 0)

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
    phases = f"; by phase: {describe_phases(report['by_phase'])}" if report.get("by_phase") else ""
    if report["device"] == "cuda":
        return (f"{report['overall_max_allocated_gib']} GiB allocated / {report['overall_max_reserved_gib']} GiB "
                f"reserved (CUDA){phases}")
    return f"{report['peak_rss_gib']} GiB peak RSS (no CUDA){phases}"

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


def _current_bytes() -> dict[str, int]:
    """Resident memory now, all of it and its anonymous part (without the file pages a memory-mapped checkpoint
    brings in, which the kernel can drop under pressure), and on CUDA the bytes torch has allocated."""
    current = {"rss": proc_status_bytes("VmRSS") or 0, "anon": proc_status_bytes("RssAnon") or 0}
    cuda = sys.modules.get("torch.cuda")  # read off the sampling thread: torch may be half-imported, never import it
    if cuda is not None and getattr(cuda, "is_initialized", lambda: False)():
        current["cuda"] = max(cuda.memory_allocated(i) for i in range(cuda.device_count()))
    return current


class PhasePeaks(logging.Handler):
    """Peak memory of each phase of a run, sampled every `interval` seconds by a thread: resident memory, and on
    CUDA allocated bytes. A phase is the step named by the latest log line (`logs.step`): the handler reads it
    off each record, so the phases are the steps the log shows, and a phase the planner misses shows up here."""

    def __init__(self, interval: float = 0.02):
        super().__init__()
        self.interval, self.phase, self.peaks = interval, "start", {}
        self._done, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._run, name="phase-peaks", daemon=True)

    def emit(self, record) -> None:
        name = getattr(record, "step", None)
        if name is not None and name != self.phase:
            self.sample()  # what the ending phase reached up to its last moment
            self.phase = name

    def sample(self) -> None:
        current = _current_bytes()
        with self._lock:
            peaks = self.peaks.setdefault(self.phase, {})
            for kind, value in current.items():
                peaks[kind] = max(peaks.get(kind, 0), value)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the sampling thread, with a last sample of the phase it was in."""
        self._done.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict[str, dict[str, float]]:
        """{phase: {"rss_gib": .., "cuda_allocated_gib": ..}} in the order the phases came."""
        names = {"rss": "rss_gib", "anon": "rss_anon_gib", "cuda": "cuda_allocated_gib"}
        with self._lock:
            return {phase: {names[kind]: round(value / GIB, 3) for kind, value in peaks.items()}
                    for phase, peaks in self.peaks.items()}


@contextmanager
def phase_peaks(logger_name: str = "train", interval: float = 0.02):
    """Sample memory per logged step for the duration of the block (see PhasePeaks)."""
    sampler = PhasePeaks(interval)
    logger = logging.getLogger(logger_name)
    logger.addHandler(sampler)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()
        logger.removeHandler(sampler)


def describe_phases(report: dict[str, dict[str, float]]) -> str:
    """'model 0.99, train 1.31, merge 1.12 GiB' from PhasePeaks.report(): GPU allocated where there is CUDA."""
    kind = "cuda_allocated_gib" if any("cuda_allocated_gib" in p for p in report.values()) else "rss_gib"
    return ", ".join(f"{phase} {peaks.get(kind, 0):.2f}" for phase, peaks in report.items()) + " GiB"
