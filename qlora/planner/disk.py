"""Predicted disk use of a run (checkpoints, adapter, merged model), checked against the free disk before
training starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from qlora.core.files import check_free_disk
from qlora.core.logs import step
from qlora.core.memory import count_parameters, format_size
from qlora.train.options import OPTIMIZERS
from qlora.train.peft import PeftKind


def disk_needed_for_config(plan: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, int]:
    """`disk_needed` from a plan (config.json alone, no model): the trainable bytes are its gradients'."""
    params = plan["params"]
    head_copy = params["embedding"] if cfg["keep_lm_head_fp16"] else 0  # an fp16 head of its own
    return disk_needed_by_run(plan["parts"]["gradients"], plan["trainable_params"], sum(params.values()) + head_copy,
                              cfg)


def disk_needed(trainable_bytes: int, trainable_params: int, optim: str, keep_checkpoints: int,
                merged_params: int, adapter: bool = True) -> dict[str, int]:
    """Estimated bytes a run writes: `keep_checkpoints` + 1 checkpoints (the Trainer writes a new one before
    rotating the oldest out), the final adapter (none for full fine-tuning), and a bf16 model of
    `merged_params` (0: none)."""
    checkpoint = int(trainable_bytes + trainable_params * OPTIMIZERS[optim].state_bytes) + 1_000_000
    merged, adapter_bytes = merged_params * 2, trainable_bytes if adapter else 0
    return {"checkpoint": checkpoint, "adapter": adapter_bytes, "merged": merged,
            "total": (keep_checkpoints + 1) * checkpoint + adapter_bytes + merged}


def disk_needed_by_run(trainable_bytes: int, trainable_params: int, model_params: int,
                       cfg: Mapping[str, Any]) -> dict[str, int]:
    """`disk_needed` for what the run's constants write: a bf16 model of `model_params` when it merges or
    fine-tunes fully, an adapter unless it fine-tunes fully."""
    full = cfg["PEFT_CONFIG"] == PeftKind.FULL
    return disk_needed(trainable_bytes, trainable_params, cfg["optim"], cfg["keep_checkpoints"],
                       model_params if cfg["merge_after_train"] or full else 0, adapter=not full)


def disk_needed_for(model, cfg: Mapping[str, Any]) -> dict[str, int]:
    """`disk_needed` for a model ready to train under the run's constants."""

    trainable, total = count_parameters(model)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    head_copy = model.get_output_embeddings().weight.numel() if cfg["keep_lm_head_fp16"] else 0  # untied fp16 head
    return disk_needed_by_run(trainable_bytes, trainable, total + head_copy, cfg)


def check_disk_for_run(model, cfg: Mapping[str, Any], root: Path) -> dict[str, int]:
    """What the run will write, checked against the free disk under `root` before training starts."""

    disk = disk_needed_for(model, cfg)
    check_free_disk(root, disk["total"], f"{cfg['keep_checkpoints'] + 1} checkpoints and the outputs")
    step("disk", "%s per checkpoint, %s merged model, %s in all", format_size(disk["checkpoint"]),
         format_size(disk["merged"]), format_size(disk["total"]))
    return disk
