"""Distributed launches (torchrun / accelerate launch): who this process is, what is refused before any
load, and how per-rank results reach the main process.

The engines are torch.distributed, accelerate and transformers' Trainer; this module only reads what
they put in the environment and gathers small Python objects across ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

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
    weights must be stored in the model's dtype; elsewhere uint8 is the default.
    """
    if setting not in QUANT_STORAGE_CHOICES:
        raise ValueError(f"bnb_4bit_quant_storage={setting!r} is unknown; allowed: {', '.join(QUANT_STORAGE_CHOICES)}")
    if setting == "auto":
        return compute_dtype if fsdp else None
    return None if setting == "uint8" else setting


def check_launch(ctx: LaunchContext, cfg: Mapping[str, Any], cuda_available: bool) -> None:
    """Refuse launch/config combinations known to fail or, worse, to train silently wrong."""
    if not ctx.fsdp:
        return
    if not cuda_available:
        raise ValueError("FSDP needs CUDA GPUs (bitsandbytes 4-bit layers are sharded on GPU only); "
                         "on CPU use DDP: torchrun --nproc_per_node N Fine-tuning/01_Train.py")
    storage = resolve_quant_storage(cfg["bnb_4bit_quant_storage"], True)
    if str(cfg["QUANT_METHOD"]).upper() == "QLORA" and storage != "bfloat16":
        raise ValueError(f"bnb_4bit_quant_storage={cfg['bnb_4bit_quant_storage']!r} under FSDP: the 4-bit storage "
                         "dtype must equal the model dtype (bfloat16) or training silently gives loss 0/NaN; "
                         "allowed with FSDP: auto, bfloat16")
    if str(cfg["optim"]).startswith("paged_"):
        raise ValueError(f"optim={cfg['optim']!r} under FSDP: paged optimizer state lives outside what FSDP's sharded "
                         "checkpoints save and restore; use adamw_torch")
    if cfg["PEFT_CONFIG"] == "DoRa":
        raise ValueError("PEFT_CONFIG='DoRa' under FSDP is not supported here; use LoRa")


def gather(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (just `[obj]` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def combine_peak_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One peak-memory report from each rank's `peak_memory_report()`: every GPU listed with its rank."""
    per_gpu = [dict(gpu, rank=rank) for rank, report in enumerate(reports) for gpu in report["per_gpu"]]
    combined = dict(reports[0], per_gpu=per_gpu, peak_rss_gib=max(r["peak_rss_gib"] for r in reports),
                    peak_rss_gib_per_rank=[r["peak_rss_gib"] for r in reports], world_size=len(reports))
    if per_gpu:
        combined["overall_max_allocated_gib"] = max(g["peak_allocated_gib"] for g in per_gpu)
        combined["overall_max_reserved_gib"] = max(g["peak_reserved_gib"] for g in per_gpu)
    return combined
