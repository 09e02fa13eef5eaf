"""The run's hooks into the Trainer: mark each checkpoint complete once written, stop cleanly on SIGINT/SIGTERM,
stop before saving a step whose loss is not finite.

Its own module because subclassing `TrainerCallback` imports transformers (seconds): qlora.train.trainer imports it
only when it builds the trainer, so a bad constant is refused before the training stack loads.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback

from qlora.core.errors import UserError
from qlora.core.logs import step
from qlora.train.checkpoints import write_marker


class MarkCompleteCallback(TrainerCallback):
    """Writes the completeness marker into each checkpoint after the Trainer has saved all of it."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # one writer under DDP/FSDP
            write_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step, self.cfg)

def _announce_stop(name: str) -> None:

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

class NonFiniteLossError(UserError):
    """Training produced a nan or infinite loss; the run stopped before saving that state."""

class StopOnNonFiniteLossCallback(TrainerCallback):
    """Raises NonFiniteLossError at the end of an optimizer step whose training loss was nan or inf, before the
    Trainer logs, evaluates or saves that step: every checkpoint on disk holds a state reached by finite losses.

    The callback API passes no loss, so `watch(trainer)` records each micro-batch's loss as
    `trainer.training_step` returns it (a device tensor, summed; one host sync per optimizer step).
    `qlora.train.trainer.build_trainer` calls `watch` for this callback.
    """

    def __init__(self):
        self._step_loss = None
        self._watching = False

    def watch(self, trainer) -> None:
        training_step = trainer.training_step
        self._watching = True

        def recording_training_step(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
            return loss

        trainer.training_step = recording_training_step

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._watching:  # a programming error: without the losses this callback would check nothing
            raise RuntimeError("StopOnNonFiniteLossCallback needs watch(trainer) (qlora.train.trainer.build_trainer calls it)")

    def on_step_end(self, args, state, control, **kwargs):
        loss, self._step_loss = self._step_loss, None
        value = float(loss) if loss is not None else 0.0
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at step {state.global_step}: training diverged (a lower learning_rate "
                "usually helps; with a changed learning_rate pass --RESUME=never); this step was not saved, the "
                "checkpoints before it are intact")
