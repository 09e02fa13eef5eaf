"""The trainer: TRL's SFTConfig and SFTTrainer built from the run's constants, training (or resuming), and
what it measured (TrainResult)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from qlora.core.logs import step
from qlora.train.checkpoints import keep_trainable_dtypes, restore_finished
from qlora.train.options import report_to_list


def sft_config(cfg: Mapping[str, Any], output_dir: Path, device: str, **overrides):
    """TRL's SFTConfig for the run: bf16, loss on completions only, resumable checkpoints every save_steps,
    the run's experiment trackers (`report_to`, none by default). With `packing`, rows are packed
    best-fit-decreasing into rows of max_seq_length tokens, padding-free: each row keeps its own positions,
    which keep rows from attending to one another (transformers builds a block-diagonal mask from them for
    sdpa and eager attention; flash attention takes the row boundaries)."""
    from trl import SFTConfig

    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg["per_device_train_batch_size"],
        per_device_eval_batch_size=cfg["per_device_train_batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"], learning_rate=cfg["learning_rate"],
        num_train_epochs=cfg["num_train_epochs"], max_steps=cfg["max_steps"], max_length=cfg["max_seq_length"],
        packing=cfg["packing"], packing_strategy="bfd",
        optim=cfg["optim"], logging_steps=cfg["logging_steps"], seed=cfg["seed"], bf16=True,
        gradient_checkpointing=cfg["gradient_checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps", save_steps=cfg["save_steps"], save_total_limit=cfg["keep_checkpoints"],
        report_to=report_to_list(cfg.get("report_to", "none")), completion_only_loss=True, use_cpu=device == "cpu",
    )
    options.update(overrides)
    return SFTConfig(**options)


def build_trainer(model, tokenizer, cfg: Mapping[str, Any], train_data, eval_data, output_dir: Path, device: str,
                  compute_loss_func=None, **sft_overrides):
    """The SFTTrainer of a run: checkpoints marked complete once fully written, a clean stop on SIGINT/SIGTERM,
    one error line (and no checkpoint of it) on a non-finite loss, and trainable parameters that keep their
    dtype when a checkpoint is resumed."""
    from trl import SFTTrainer

    # subclasses of transformers' TrainerCallback: imported here, so that a bad constant is refused before torch loads
    from qlora.train.callbacks import (MarkCompleteCallback, ReleaseFreeHeapCallback, StopOnNonFiniteLossCallback,
                                       StopOnSignalCallback)

    held_out = eval_data if eval_data is not None and len(eval_data) else None
    # held-out loss at every checkpoint: eval_samples forward passes per save_steps optimizer steps
    periodic_eval = {"eval_strategy": "steps", "eval_steps": cfg["save_steps"]} if held_out is not None else {}
    non_finite = StopOnNonFiniteLossCallback()
    trainer = SFTTrainer(model=model, args=sft_config(cfg, output_dir, device, **{**periodic_eval, **sft_overrides}),
                         train_dataset=train_data, eval_dataset=held_out, processing_class=tokenizer,
                         callbacks=[MarkCompleteCallback(cfg), StopOnSignalCallback(), non_finite]
                         + ([ReleaseFreeHeapCallback()] if device == "cpu" else []),
                         compute_loss_func=compute_loss_func)
    non_finite.watch(trainer)
    evaluation_keeps_random_state(trainer)
    keep_trainable_dtypes(trainer)
    keep_tracker_logs(trainer, Path(output_dir).parent / "tensorboard")
    return trainer


def evaluation_keeps_random_state(trainer) -> None:
    """Each evaluation runs on a fork of the random number generators, so training resumes with the state it
    left: creating the eval dataloader's iterator draws its base seed from torch's global generator, which the
    adapters' dropout also draws from, so two runs differing only in save_steps (which sets how often the
    held-out loss is taken) otherwise trained differently after the first evaluation."""
    import torch

    evaluate = trainer.evaluate

    def evaluate_on_forked_rng(*args, **kwargs):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(*args, **kwargs)

    trainer.evaluate = evaluate_on_forked_rng


def keep_tracker_logs(trainer, directory: Path) -> None:
    """TensorBoard writes under the Trainer's output_dir (the checkpoints, removed when the run is published)
    unless TENSORBOARD_LOGGING_DIR says otherwise: its events go to `directory`, beside the model, instead."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(directory)


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps the adapter has had, resumed ones included
    resumed_step: int  # the step this process resumed from (0: a fresh start)
    train_loss: float | None  # mean over the steps this process ran (None: nothing left to run)
    eval_loss: float | None  # held-out loss after training (None: no held-out rows)
    loss_curve: list[float]  # every logged training loss, resumed history included
    seconds: float
    loss_steps: tuple[int, ...] = ()  # the optimizer step of each loss_curve entry
    eval_curve: tuple[tuple[int, float], ...] = ()  # (step, held-out loss): every save_steps, and after training

    def metadata(self, **launch: Any) -> dict[str, Any]:
        """metadata.json's `training` block."""
        return {"steps": self.steps, "resumed_from_step": self.resumed_step, "train_loss": self.train_loss,
                "loss_curve": self.loss_curve, "loss_steps": list(self.loss_steps), "eval_loss": self.eval_loss,
                "eval_loss_curve": [loss for _, loss in self.eval_curve],
                "eval_loss_steps": [step for step, _ in self.eval_curve], "train_seconds": round(self.seconds, 2),
                **launch}

    def losses_text(self) -> str:
        text = lambda loss: "n/a" if loss is None else f"{loss:.4f}"  # noqa: E731
        return f"train loss {text(self.train_loss)}, held-out loss {text(self.eval_loss)}"


def train(trainer, resume_checkpoint: Path | None) -> TrainResult:
    """Train from the start or from `resume_checkpoint`; a checkpoint taken at the last step is restored
    without training (Trainer.train would run one step too many when max_steps ends inside an epoch)."""
    from transformers import TrainerState

    resumed = TrainerState.load_from_json(str(resume_checkpoint / "trainer_state.json")) if resume_checkpoint else None
    step("train", "training%s", f" from {resume_checkpoint.name}" if resumed else "")
    started = time.time()
    if resumed is not None and resumed.global_step >= resumed.max_steps:
        restore_finished(trainer, resume_checkpoint)
        train_loss = None
    else:
        train_loss = trainer.train(resume_from_checkpoint=str(resume_checkpoint) if resumed else None).training_loss
    seconds = time.time() - started
    stop_on_signal(trainer)
    eval_loss = None
    if trainer.eval_dataset is not None:
        step("eval", "held-out loss on %d rows", len(trainer.eval_dataset))
        eval_loss = trainer.evaluate()["eval_loss"]
    history = trainer.state.log_history
    eval_by_step = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}  # last per step
    result = TrainResult(trainer.state.global_step, resumed.global_step if resumed else 0, train_loss, eval_loss,
                         [entry["loss"] for entry in history if "loss" in entry], seconds,
                         tuple(entry["step"] for entry in history if "loss" in entry),
                         tuple(sorted(eval_by_step.items())))
    step("train", "%d steps (%d in this run) in %.1fs, %s", result.steps, result.steps - result.resumed_step,
         result.seconds, result.losses_text())
    return result


def stop_on_signal(trainer) -> None:
    """Exit (128 + the signal's number) when a signal stopped training; its checkpoint is already saved."""
    import signal

    from qlora.train.callbacks import StopOnSignalCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, StopOnSignalCallback) and callback.received is not None:
            step("stopped", "%s: stopped at step %d of %d; checkpoint saved in %s; run the same command again to "
                 "resume", signal.Signals(callback.received).name, trainer.state.global_step, trainer.state.max_steps,
                 Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}")
            raise SystemExit(128 + callback.received)
