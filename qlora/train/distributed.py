"""Distributed launches (torchrun / accelerate launch): who this process is, what is refused before any
load, and how per-rank results reach the main process.

The engines are torch.distributed, accelerate and transformers' Trainer; this module only reads what
they put in the environment and gathers small Python objects across ranks.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Mapping

from qlora.core.errors import UserError
from qlora.core.logs import setup_logging, step
from qlora.core.memory import peak_memory_report
from quantization_utils import QuantMethod


QUANT_STORAGE_CHOICES = ("auto", "uint8", "bfloat16", "float16", "float32")
_TRUE = ("1", "true", "yes")

@dataclass(frozen=True)
class LaunchContext:
    world_size: int
    rank: int
    local_rank: int
    fsdp: bool  # accelerate launch with an FSDP config sets ACCELERATE_USE_FSDP

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

def launch_context(env: Mapping[str, str] | None = None) -> LaunchContext:
    """This process's place in the launch, read from the variables torchrun / accelerate set."""
    env = os.environ if env is None else env
    return LaunchContext(
        world_size=int(env.get("WORLD_SIZE", "1")),
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        fsdp=env.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE,
    )

def resolve_quant_storage(setting: str, fsdp: bool, compute_dtype: str = "bfloat16") -> str | None:
    """The bnb_4bit_quant_storage dtype name to use, or None for bitsandbytes' default (uint8).

    FSDP flattens and shards only float tensors of one dtype per unit, so under FSDP the packed 4-bit
    weights must be stored in the model's dtype; elsewhere uint8 is the default. `setting` is one of
    QUANT_STORAGE_CHOICES (qlora.config refuses any other before anything loads).
    """
    if setting == "auto":
        return compute_dtype if fsdp else None
    return None if setting == "uint8" else setting

def check_launch(ctx: LaunchContext, cfg: Mapping[str, Any], cuda_available: bool | None = None) -> None:
    """Refuse launch/config combinations known to fail or, worse, to train silently wrong."""
    if not ctx.fsdp:
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise UserError("FSDP needs CUDA GPUs (bitsandbytes 4-bit layers are sharded on GPU only); "
                         "on CPU use DDP: torchrun --nproc_per_node N Fine-tuning/01_Train.py")
    storage = resolve_quant_storage(cfg["bnb_4bit_quant_storage"], True)
    if cfg["QUANT_METHOD"] == QuantMethod.QLORA and storage != "bfloat16":
        raise UserError(f"bnb_4bit_quant_storage={cfg['bnb_4bit_quant_storage']!r} under FSDP: the 4-bit storage "
                         "dtype must equal the model dtype (bfloat16) or training silently gives loss 0/NaN; "
                         "allowed with FSDP: auto, bfloat16")
    if str(cfg["optim"]).startswith("paged_"):
        raise UserError(f"optim={cfg['optim']!r} under FSDP: paged optimizer state lives outside what FSDP's sharded "
                         "checkpoints save and restore; use adamw_torch")
    if cfg["PEFT_CONFIG"] in ("DoRa", "Full"):  # Full: the sharded model is gathered and reloaded as an adapter
        raise UserError(f"PEFT_CONFIG={cfg['PEFT_CONFIG']!r} under FSDP is not supported here; use LoRa "
                        "(or DDP: torchrun --nproc_per_node N Fine-tuning/01_Train.py)")
    if cfg["init_lora_weights"] == "loftq":  # never run under FSDP (bfloat16 4-bit storage, sharding)
        raise UserError("init_lora_weights='loftq' under FSDP is not supported here; use default or gaussian")

def gather(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (just `[obj]` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects

def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

def leave_process_group() -> None:
    """Destroy this rank's process group before the interpreter exits: a gloo group left to the exit-time
    destructors can abort the process ("terminate called without an active exception") after a good run."""
    if "torch" not in sys.modules:  # nothing joined a group (and a config error need not wait for torch to import)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

def end_collectives() -> None:
    """Every rank, together, leaves the process group once nothing more is exchanged (rank 0 then merges
    and writes alone). Destroyed at one moment by all ranks, after a barrier: a rank that tore its group
    down on its own while rank 0 still held the other end aborted now and then at exit ("terminate called
    without an active exception"), and torchrun then killed rank 0 in the middle of its merge."""
    barrier()
    leave_process_group()

def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (just `obj` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]

def start_device(launch: LaunchContext, seed: int) -> str:
    """This process's device ("cpu", "cuda" or, in a distributed launch, "cuda:N"), with the process group
    joined, the seed set and the CUDA peak counters reset, so the run's peaks are its own."""
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    state = PartialState()  # joins the process group of a distributed launch; a no-op for a single process
    device = state.device.type if not launch.distributed else str(state.device)
    set_seed(seed)
    if launch.distributed:
        step("model", "%s launch: %d processes, one per %s", "FSDP" if launch.fsdp else "DDP", launch.world_size,
             state.device.type)
    if device == "cpu":
        step("model", "no CUDA device: running on CPU (bitsandbytes NF4 CPU kernels; paged optimizers run unpaged)")
    else:
        torch.cuda.reset_peak_memory_stats()
    return device

def combine_peak_reports(reports: list[dict[str, Any]], by_phase: dict | None = None) -> dict[str, Any]:
    """One peak-memory report from each rank's `peak_memory_report()` (rank 0's taken last: its merge counts):
    every GPU listed with its rank; `by_phase` (rank 0's `PhasePeaks.report()`) kept as it is."""
    per_gpu = [dict(gpu, rank=rank) for rank, report in enumerate(reports) for gpu in report["per_gpu"]]
    combined = dict(reports[0], per_gpu=per_gpu, peak_rss_gib=max(r["peak_rss_gib"] for r in reports),
                    peak_rss_gib_per_rank=[r["peak_rss_gib"] for r in reports], world_size=len(reports),
                    by_phase=by_phase or {})
    if per_gpu:
        combined["overall_max_allocated_gib"] = max(g["peak_allocated_gib"] for g in per_gpu)
        combined["overall_max_reserved_gib"] = max(g["peak_reserved_gib"] for g in per_gpu)
    return combined


@contextmanager
def launched(env: Mapping[str, str] | None = None):
    """This process's place in the launch (one process per device under torchrun / accelerate launch; rank 0
    logs and writes), with the log set up for it. However the block is left, this rank's process group is
    destroyed: none is left to the exit-time destructors."""
    launch = launch_context(env)
    setup_logging(launch.is_main)
    try:
        yield launch
    finally:
        leave_process_group()


def own_peak_memory(launch: LaunchContext, device: str) -> dict[str, Any]:
    """This rank's peak memory report: its own GPU under a launch with one GPU per rank, else the process's."""
    return peak_memory_report([launch.local_rank] if device.startswith("cuda:") else None)
