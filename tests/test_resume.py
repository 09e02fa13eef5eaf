"""Crash safety, end to end in subprocesses: SIGKILL then resume, SIGTERM saves and stops, a truncated
checkpoint is skipped, a changed config is refused. Each run trains a tiny Qwen3 for 6 steps."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import OPENMATH_SAMPLE, TRAIN_SCRIPT, run_train

NAME = "Qwen3-0.6B-openmath_SFT_LoRa8_QLORA_w4_headbf16"
ARGS = ["--max_steps=6", "--save_steps=2", "--logging_steps=1", "--per_device_train_batch_size=2",
        "--gradient_accumulation_steps=1", "--learning_rate=2e-3", "--max_seq_length=64", "--eval_samples=4",
        "--max_train_samples=60", "--lora_r=8"]
LOSS_RE = re.compile(r"\{'loss': '([0-9.]+)'")


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


def logged_losses(log_path):
    return LOSS_RE.findall(log_path.read_text())


def finished_looking(out):
    return [p for p in out.rglob("metadata.json")] + [p for p in out.iterdir() if not p.name.startswith(".")]


@pytest.fixture()
def run_args(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    return out, [f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}", *ARGS]


def test_sigkill_after_first_checkpoint_then_rerun_resumes_to_the_same_steps(run_args, tmp_path):
    out, args = run_args
    checkpoints = out / f".{NAME}.partial" / "checkpoints"
    log = tmp_path / "killed.log"
    process = start_train(args, log)
    # killed after checkpoint-2 is complete and step 3 has logged its loss
    wait_until(process, lambda: (checkpoints / "checkpoint-2" / "checkpoint_complete.json").exists()
               and len(logged_losses(log)) >= 3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_losses = logged_losses(log)
    assert finished_looking(out) == []  # the killed run left nothing that looks finished

    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_from = int(re.search(r"resuming from \S+checkpoint-(\d+) \(step (\d+)\)", result.stderr).group(2))
    assert 2 <= resumed_from < 6
    meta = json.loads((out / NAME / "metadata.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["training"]["resumed_from_step"] == resumed_from
    curve = meta["training"]["loss_curve"]
    assert len(curve) == 6  # continuous: the steps before the checkpoint come from it, the rest from the rerun
    # optimizer, scheduler, RNG and data position restored: the steps redone after the checkpoint
    # reproduce the losses the killed run logged for them
    assert [f"{loss:.4g}" for loss in curve[:len(killed_losses)]] == killed_losses
    assert [p.name for p in out.iterdir()] == [NAME]  # staging and checkpoints gone


def test_sigterm_saves_a_checkpoint_that_resumes_and_a_truncated_one_is_skipped(run_args, tmp_path):
    out, args = run_args
    checkpoints = out / f".{NAME}.partial" / "checkpoints"
    log = tmp_path / "terminated.log"
    process = start_train(args, log)
    wait_until(process, lambda: (checkpoints / "checkpoint-2" / "checkpoint_complete.json").exists())
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=240) == 128 + signal.SIGTERM
    text = log.read_text()
    stopped = re.search(r"SIGTERM: stopped at step (\d+) of 6; checkpoint saved in (\S+)", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 2 < step < 6 and (checkpoints / f"checkpoint-{step}" / "checkpoint_complete.json").exists()
    assert finished_looking(out) == []

    # a changed result-affecting constant is refused before anything loads, and nothing is touched
    before = sorted(p.name for p in checkpoints.iterdir())
    changed = run_train([*args, "--learning_rate=1e-3"])
    assert changed.returncode != 0
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the config differs (learning_rate=0.002 -> 0.001)" in errors[0], changed.stderr[-2000:]
    assert "loaded on" not in changed.stderr and sorted(p.name for p in checkpoints.iterdir()) == before

    # the newest checkpoint truncated (a crash while copying, a full disk): skipped with a warning
    previous = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if p.name != f"checkpoint-{step}")
    weights = checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"WARNING: skipping checkpoint \S+checkpoint-{step}: adapter_model.safetensors has 100 bytes",
                     result.stderr)
    assert f"checkpoint-{previous} (step {previous})" in result.stderr
    meta = json.loads((out / NAME / "metadata.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["training"]["resumed_from_step"] == previous
    assert len(meta["training"]["loss_curve"]) == 6
