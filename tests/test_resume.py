"""Crash safety, end to end in subprocesses: SIGKILL then resume, a corrupted checkpoint skipped, SIGTERM
saves and stops, a changed config refused, a kill after training. Each run trains a tiny Qwen3 for 6 steps."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from qlora.train.checkpoints import MARKER, checkpoint_problem
from conftest import OPENMATH_SAMPLE, TRAIN_SCRIPT, run_train

NAME = "Qwen3-0.6B-openmath_SFT_LoRa8_QLORA_w4_headbf16"
ARGS = ["--max_steps=6", "--save_steps=2", "--logging_steps=1", "--per_device_train_batch_size=2",
        "--gradient_accumulation_steps=1", "--learning_rate=2e-3", "--max_seq_length=64", "--eval_samples=4",
        "--max_train_samples=60", "--lora_r=8"]


def start_train(args, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], stdout=log, stderr=subprocess.STDOUT)


def wait_until(process, condition, timeout=240):
    """Poll every 20 ms until `condition()`; fails if the process exits first."""
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the point where it was to be interrupted"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def finished_looking(out):
    return [p for p in out.rglob("metadata.json")] + [p for p in out.iterdir() if not p.name.startswith(".")]


@pytest.fixture()
def run_args(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    return out, [f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}", *ARGS]


def test_sigkill_then_rerun_skips_the_corrupted_checkpoint_and_resumes_exactly(run_args, tmp_path):
    out, args = run_args
    checkpoints = out / f".{NAME}.partial" / "checkpoints"
    process = start_train(args, tmp_path / "killed.log")
    wait_until(process, lambda: (checkpoints / "checkpoint-4" / MARKER).exists())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert finished_looking(out) == []  # the killed run left nothing that looks finished
    # what the killed run computed for steps 1-4, at full precision
    killed_curve = [entry["loss"] for entry in json.loads((checkpoints / "checkpoint-4" / "trainer_state.json")
                                                           .read_text())["log_history"] if "loss" in entry]
    optimizer = checkpoints / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(bytes(optimizer.stat().st_size))  # the right size, zeros inside (a lost write-back)

    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"WARNING: skipping checkpoint \S+checkpoint-4: optimizer.pt does not match the sha256 taken "
                     "when it was saved", result.stderr)
    assert "checkpoint-2 (step 2)" in result.stderr
    meta = json.loads((out / NAME / "metadata.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["training"]["resumed_from_step"] == 2
    curve = meta["training"]["loss_curve"]
    assert len(curve) == 6
    # adapter, optimizer, scheduler, RNG and data position restored: steps 3 and 4, redone from
    # checkpoint-2, compute exactly what the killed run computed
    assert curve[:4] == killed_curve
    assert [p.name for p in out.iterdir()] == [NAME]  # staging and checkpoints gone


def test_sigterm_saves_a_checkpoint_and_stops_then_the_run_resumes(run_args, tmp_path):
    out, args = run_args
    checkpoints = out / f".{NAME}.partial" / "checkpoints"
    log = tmp_path / "terminated.log"
    process = start_train(args, log)
    wait_until(process, lambda: (checkpoints / "checkpoint-2" / MARKER).exists())
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=240) == 128 + signal.SIGTERM
    text = log.read_text()
    stopped = re.search(r"SIGTERM: stopped at step (\d+) of 6; checkpoint saved in (\S+)", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 2 < step < 6 and checkpoint_problem(checkpoints / f"checkpoint-{step}") is None
    assert finished_looking(out) == []

    # a changed result-affecting constant is refused before anything loads, and nothing is touched
    before = sorted(p.name for p in checkpoints.iterdir())
    changed = run_train([*args, "--learning_rate=1e-3"])
    assert changed.returncode != 0
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the config differs (learning_rate=0.002 -> 0.001)" in errors[0], changed.stderr[-2000:]
    assert "loaded on" not in changed.stderr and sorted(p.name for p in checkpoints.iterdir()) == before

    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint-{step} (step {step})" in result.stderr
    meta = json.loads((out / NAME / "metadata.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["training"]["resumed_from_step"] == step
    assert len(meta["training"]["loss_curve"]) == 6


@pytest.mark.slow
def test_a_kill_after_training_resumes_from_the_last_step_without_training_again(run_args, tmp_path):
    out, args = run_args
    log = tmp_path / "killed.log"
    process = start_train(args, log)
    # killed after training, in the held-out eval / merge / save
    wait_until(process, lambda: re.search(r"train +\| 6 steps", log.read_text()))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert finished_looking(out) == []

    result = run_train(args)  # the checkpoint of step 6 is restored; no step is run again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training had finished: 6 steps restored, none to run" in result.stderr
    meta = json.loads((out / NAME / "metadata.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["training"]["resumed_from_step"] == 6
    assert len(meta["training"]["loss_curve"]) == 6 and meta["merge_check"]["passed"]


def test_save_steps_changes_neither_losses_nor_weights(tiny_model_dir, tmp_path):
    """save_steps is result-neutral (a resumed run may change it): the held-out evaluation at each checkpoint
    leaves the training's random state (the adapters' dropout) as it found it, so two runs that differ only in
    save_steps log the same losses and train the same adapter."""
    from safetensors.torch import load_file

    args = [arg for arg in ARGS if not arg.startswith("--save_steps=")]
    runs = {}
    for save_steps in (2, 100):
        out = tmp_path / f"save_steps_{save_steps}"
        result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
                            *args, f"--save_steps={save_steps}", "--merge_after_train=false"])
        assert result.returncode == 0, result.stderr[-3000:]
        directory = next(out.iterdir())
        training = json.loads((directory / "metadata.json").read_text())["training"]
        runs[save_steps] = (training, load_file(directory / "adapter" / "adapter_model.safetensors"))
    (often, often_weights), (once, once_weights) = runs[2], runs[100]
    assert often["eval_loss_steps"] == [2, 4, 6] and once["eval_loss_steps"] == [6]  # the evaluations did differ
    assert often["loss_curve"] == once["loss_curve"] and often["eval_loss"] == once["eval_loss"]
    assert often_weights.keys() == once_weights.keys()
    assert all(torch.equal(often_weights[name], once_weights[name]) for name in often_weights)
