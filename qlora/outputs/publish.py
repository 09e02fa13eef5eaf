"""The end of a training run: its metadata.json assembled from what the run measured, the loss plot and
model cards written, and the staging directory published under its final name."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from qlora.core.files import absolute_if_local, write_json
from qlora.outputs.loss_plot import write_loss_plot
from qlora.outputs.model_card import base_model_license, write_model_cards
from qlora.train.peft import PeftKind, peft_options
from quantization_utils import build_metadata, peft_tag


# The stack whose versions every output records: the seed's libraries, plus what a PTQ backend adds.
STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the stack and of `extra` packages (a package not installed is left out)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in STACK + tuple(extra):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def run_metadata(*, spec, cfg: dict, data, prompt_format: str, parameters: tuple[int, int], footprint: dict,
                 artifact: dict, merge_check: dict | None, generation: dict | None, peak: dict, training: dict,
                 memory_plan: dict) -> dict[str, Any]:
    """metadata.json of a training run: the seed's quantization block (`build_metadata`), then what a user needs
    to reproduce and trust the run; every value is of the directory it is written into."""
    trainable, total = parameters
    return build_metadata(
        spec, base_model=absolute_if_local(cfg["MODEL_NAME"]), base_license=base_model_license(cfg["MODEL_NAME"]),
        peft=peft_tag(cfg["PEFT_CONFIG"], cfg["lora_r"]),
        peft_options=peft_options(cfg), config=cfg, versions=library_versions(),
        dataset={**data.metadata(), "prompt_format": prompt_format},
        artifact={**artifact, "adapter_dir": "adapter" if cfg["PEFT_CONFIG"] != PeftKind.FULL else None},
        parameters={"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 4)},
        weights_footprint=footprint, merge_check=merge_check, generation_check=generation, peak_memory=peak,
        training=training, memory_plan=with_measured_peak(memory_plan, peak), created_unix=int(time.time()))


def publish_run(run, cfg: dict, metadata: dict) -> Path:
    """Finish a training run's staging directory (checkpoints dropped; loss plot, model cards, config and
    metadata written; all flushed and marked complete) and publish it under its final name."""
    shutil.rmtree(run.staging / "checkpoints", ignore_errors=True)
    write_loss_plot(run.staging, metadata)  # training_loss.png
    write_model_cards(run.staging, metadata, run.final)  # README.md, adapter/README.md
    write_json(run.staging / "resolved_config.json", cfg)
    write_json(run.staging / "metadata.json", metadata)
    run.mark_staged()
    return run.publish()


def with_measured_peak(plan: Mapping[str, Any], peak: Mapping[str, Any]) -> dict[str, Any]:
    """The plan with the measured peak (max allocated on CUDA, else peak RSS) and the planner's relative error."""
    measured = peak["overall_max_allocated_gib"] if peak["device"] == "cuda" else peak["peak_rss_gib"]
    out = dict(plan, measured_gib=measured)
    if plan.get("peak_gib") is not None and measured:
        out["relative_error"] = round((plan["peak_gib"] - measured) / measured, 4)
    return out
