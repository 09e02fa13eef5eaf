"""Resumable training: complete checkpoints, which one to resume from, stopping on a signal.

A Trainer checkpoint (`checkpoint-N/`: adapter, optimizer, scheduler, RNG states, trainer state with
the step and loss history) counts as complete only once `MarkCompleteCallback` has written
`checkpoint_complete.json` into it, after everything else: the marker lists every file with its
size and the config that affects results. A checkpoint without the marker, or whose files no longer
have the listed sizes (truncated, deleted), is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback

from config_utils import ConfigError

MARKER = "checkpoint_complete.json"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
# Constants that change neither the trained weights nor the loss curve: a resumed run may differ in these.
RESULT_NEUTRAL = frozenset({"RESUME", "OUTPUT_ROOT", "if_output_exists", "save_steps", "keep_checkpoints",
                            "merge_check_max_kl"})

def result_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that decides the result of a run."""
    return {name: value for name, value in cfg.items() if name not in RESULT_NEUTRAL}

def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_RE.fullmatch(path.name)
    return int(match.group(1)) if match else -1

def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MARKER}

def write_marker(directory: Path, step: int, cfg: Mapping[str, Any]) -> None:
    """Mark a fully written checkpoint complete (atomically: a crash leaves no half-written marker)."""
    marker = {"step": step, "files": _file_sizes(directory), "config": result_config(cfg)}
    tmp = directory / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, directory / MARKER)

def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete checkpoint, or None if it is."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except FileNotFoundError:
        return f"no {MARKER} (the save did not finish)"
    except (OSError, ValueError):
        return f"unreadable {MARKER}"
    for name, size in marker.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    if not marker.get("files"):
        return f"{MARKER} lists no files"
    return None

def read_marker_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MARKER).read_text())["config"]

def config_differences(saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    """`name=saved -> now` for every result-affecting constant that differs."""
    now = result_config(cfg)
    return [f"{name}={saved.get(name)!r} -> {now.get(name)!r}" for name in sorted(set(saved) | set(now))
            if saved.get(name) != now.get(name)]

@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path | None  # the checkpoint to resume from; None = start from step 0
    skipped: tuple[tuple[Path, str], ...]  # checkpoints found unusable, with the reason
    start_over: bool  # True: remove the staging directory before training

def plan_resume(resume: str, checkpoints_dir: Path, cfg: Mapping[str, Any]) -> ResumePlan:
    """Which checkpoint to continue from. Reads marker files only; raises ConfigError on a config mismatch."""
    if resume == "never":
        return ResumePlan(None, (), True)
    if resume == "auto":
        found = sorted((p for p in checkpoints_dir.glob("checkpoint-*") if checkpoint_step(p) >= 0),
                       key=checkpoint_step, reverse=True) if checkpoints_dir.is_dir() else []
        skipped = []
        for candidate in found:
            problem = checkpoint_problem(candidate)
            if problem is None:
                _check_same_config(candidate, cfg)
                return ResumePlan(candidate, tuple(skipped), False)
            skipped.append((candidate, problem))
        return ResumePlan(None, tuple(skipped), True)
    candidate = Path(resume)
    problem = checkpoint_problem(candidate)
    if problem is not None:
        raise ConfigError(f"RESUME={resume!r} is not a complete checkpoint: {problem}")
    _check_same_config(candidate, cfg)
    return ResumePlan(candidate, (), False)

def prepare_staging(staging: Path, resume: ResumePlan, resume_setting: str) -> None:
    """The staging directory ready for training: an earlier partial run that cannot be resumed is removed,
    with a log line, and so are checkpoints found unusable."""
    from run_log import step

    if resume.start_over and staging.exists():
        reason = "RESUME=never" if resume_setting == "never" else "no complete checkpoint in it"
        step("resume", "removing the earlier partial run %s (%s)", staging, reason)
        shutil.rmtree(staging)
    for path, problem in resume.skipped:
        step("resume", "WARNING: skipping checkpoint %s: %s", path, problem)
        shutil.rmtree(path, ignore_errors=True)
    if resume.checkpoint is not None:
        step("resume", "resuming from %s (step %d)", resume.checkpoint, checkpoint_step(resume.checkpoint))
    staging.mkdir(parents=True, exist_ok=True)

def _check_same_config(checkpoint: Path, cfg: Mapping[str, Any]) -> None:
    differences = config_differences(read_marker_config(checkpoint), cfg)
    if differences:
        raise ConfigError(f"cannot resume from {checkpoint}: the config differs ({'; '.join(differences)}); "
                          "rerun with the same values, or --RESUME=never to start over")

def keep_trainable_dtypes(trainer) -> None:
    """Make the Trainer's checkpoint loader keep the trainable parameters' dtypes.

    It resumes adapters through peft's `load_adapter`, which upcasts them to fp32, while TRL trains
    QLoRA adapters in bf16: a resumed run would compute in another precision than the run it continues
    (measured: loss curves diverge in the 4th digit). Cast back right after loading, before the
    optimizer state is loaded onto them.
    """
    model = trainer.model
    dtypes = {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}
    load = trainer._load_from_checkpoint

    def load_keeping_dtypes(checkpoint, model_arg=None):
        load(checkpoint, model_arg)
        for name, param in model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    trainer._load_from_checkpoint = load_keeping_dtypes

def restore_finished(trainer, checkpoint: Path) -> None:
    """Load the weights and state of a checkpoint taken at the last step, without training.

    (`Trainer.train(resume_from_checkpoint=...)` from the last step trains one step too many when the
    run ends inside an epoch, e.g. with `max_steps`.) Uses the loader `train()` itself calls.
    """
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))

class MarkCompleteCallback(TrainerCallback):
    """Writes the completeness marker into each checkpoint after the Trainer has saved all of it."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # one writer under DDP/FSDP
            write_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step, self.cfg)

def _announce_stop(name: str) -> None:
    from run_log import step

    step("signal", "%s received: saving a checkpoint after this step, then stopping (send it again to kill now)", name)

class StopOnSignalCallback(TrainerCallback):
    """On SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. A second signal kills at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce=None):
        self.received: int | None = None
        self.announce = announce or _announce_stop
        self.previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.announce(signal.Signals(signum).name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
