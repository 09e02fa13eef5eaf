"""The run's hooks into the Trainer: mark each checkpoint complete once written, stop cleanly on SIGINT/SIGTERM,
stop before saving a step whose loss is not finite, give the C heap's freed memory back on CPU runs.

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
from qlora.core.heap import release_free_heap
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


class ReleaseFreeHeapCallback(TrainerCallback):
    """CPU runs: the C heap's freed memory goes back to the OS after each optimizer step and each evaluation batch,
    and during training between the decoder and the LM head's loss.

    A CPU step frees most of what it allocates below glibc's mmap threshold into the heap, where it stays resident
    between live blocks (glibc trims only the heap's top), and the loss's tiles came on top of the forward's freed
    blocks. Trimming costs a walk of the heap a few times a step; what it saved on the Qwen3-0.6B and Gemma 3
    architectures: docs/measurements.md, "The heap between steps".
    """

    def __init__(self):
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        decoder = _decoder_of(model)
        if decoder is not None and self._hook is None:
            self._hook = decoder.register_forward_hook(_release_after_forward)

    def on_step_end(self, args, state, control, **kwargs):
        release_free_heap()

    def on_prediction_step(self, args, state, control, **kwargs):
        release_free_heap()

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:  # generation after training calls the decoder once per token
            self._hook.remove()
            self._hook = None

def _release_after_forward(module, inputs, output):
    release_free_heap()

def _decoder_of(model):
    """The decoder stack of a (peft-wrapped) causal LM, whose forward ends where the LM head begins; None for a model
    without `get_decoder`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    return get_decoder() if callable(get_decoder) else None
