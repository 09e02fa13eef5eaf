"""The output-directory lifecycle: one lock per name, staging, publish. Unit cases with real processes
holding real locks, then end to end: two concurrent training runs with the same tag, and a run killed
between finishing its work and its final rename."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import FAST_TRAIN_ARGS, OPENMATH_SAMPLE, ROOT, TRAIN_SCRIPT, run_train
from qlora.outputs.run_dir import STAGED_MARKER, OutputDirError, check_output_root, claim

HOLD = textwrap.dedent("""
    import sys, time
    from qlora.outputs.run_dir import claim
    run = claim(__import__("pathlib").Path({out!r}), "NAME")
    print("claimed", flush=True)
    time.sleep(60)
""")


@pytest.fixture()
def holder(tmp_path):
    """Another live process holding the claim on tmp_path/NAME."""
    process = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), out=str(tmp_path))],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "claimed"
    yield process
    process.kill()
    process.wait()


def test_a_held_name_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(OutputDirError, match=rf"being written by PID {holder.pid} .*if_output_exists=suffix"):
        claim(tmp_path, "NAME")


def test_suffix_takes_the_next_free_name_with_its_own_staging(tmp_path, holder):
    (tmp_path / "NAME-2").mkdir()  # a finished output takes its name too
    with claim(tmp_path, "NAME", "suffix") as run:
        assert run.final == tmp_path / "NAME-3" and run.staging == tmp_path / ".NAME-3.partial"


def test_the_lock_of_a_dead_holder_is_taken_over_with_a_log_line(tmp_path, holder):
    holder.kill()
    holder.wait()
    lines = []
    with claim(tmp_path, "NAME", log=lines.append) as run:
        assert run.final == tmp_path / "NAME"
    assert len(lines) == 1 and f"left by PID {holder.pid}" in lines[0] and "no longer running" in lines[0]
    assert not (tmp_path / ".NAME.lock").exists()  # a clean release leaves nothing that looks stale


def test_publish_needs_the_staged_marker_and_applies_the_umask(tmp_path):
    with claim(tmp_path, "NAME") as run:
        run.staging.mkdir()
        weights = run.staging / "model.safetensors"
        weights.write_bytes(b"x")
        weights.chmod(0o600)  # what safetensors' save_file leaves
        with pytest.raises(RuntimeError, match="not marked complete"):
            run.publish()
        run.mark_staged()
        assert run.staged_complete
        old = os.umask(0o022)
        try:
            final = run.publish()
        finally:
            os.umask(old)
    assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o644
    assert not (final / STAGED_MARKER).exists() and not run.staging.exists()


@pytest.mark.parametrize("make, message", [
    (lambda root: root.write_text("x"), "is a file, not a directory"),
    (lambda root: root.mkdir(mode=0o500), "is not writable"),
])
def test_unusable_output_roots_are_one_line(tmp_path, make, message):
    root = tmp_path / "out"
    make(root)
    if message == "is not writable" and os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    with pytest.raises(OutputDirError, match=message):
        check_output_root(root / "sub")


# ----- end to end ----------------------------------------------------------------------------------------

NAME = "Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16"


def _train_args(model_dir, out, learning_rate):
    return [f"--MODEL_NAME={model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
            *FAST_TRAIN_ARGS, f"--learning_rate={learning_rate}"]


def _merged_matches_own_adapter(directory, model_dir) -> float:
    """Max |merged q_proj of layer 0 - (dequantized NF4 base + this directory's own LoRA delta)|."""
    code = f"""
import json, sys, torch
from safetensors.torch import load_file
from qlora.model.loading import load_causal_lm
from qlora.model.base_weights import dense_weight
from quantization_utils import build_quantization_plan
_, bnb = build_quantization_plan("QLORA")
base = load_causal_lm({str(model_dir)!r}, bnb, "cpu")
w = dense_weight(base.model.layers[0].self_attn.q_proj)
adapter = load_file({str(directory)!r} + "/adapter/adapter_model.safetensors")
cfg = json.load(open({str(directory)!r} + "/adapter/adapter_config.json"))
key = [k for k in adapter if "layers.0.self_attn.q_proj.lora_A" in k][0]
a, b = adapter[key].float(), adapter[key.replace("lora_A", "lora_B")].float()
expected = w + cfg["lora_alpha"] / cfg["r"] * b @ a
merged = load_file({str(directory)!r} + "/model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
print((merged - expected).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


def test_two_concurrent_runs_with_one_tag_never_mix(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    runs = {lr: subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *_train_args(tiny_model_dir, out, lr),
                                  "--if_output_exists=suffix"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
            for lr in ("2e-3", "5e-3")}
    logs = {lr: process.communicate(timeout=600)[0] for lr, process in runs.items()}
    assert all(process.returncode == 0 for process in runs.values()), logs
    assert sorted(p.name for p in out.iterdir()) == [NAME, f"{NAME}-2"]  # no staging, no lock left behind
    for lr, log in logs.items():
        written = out / log.split("; wrote ")[-1].strip().rsplit("/", 1)[-1]
        meta = json.loads((written / "metadata.json").read_text())
        assert meta["config"]["learning_rate"] == float(lr)
        assert json.loads((written / "resolved_config.json").read_text())["learning_rate"] == float(lr)
    # each directory's merged weights are its own adapter's merge (bf16 rounding apart), not the other run's
    errors = {d: _merged_matches_own_adapter(out / d, tiny_model_dir) for d in (NAME, f"{NAME}-2")}
    assert all(error < 0.05 for error in errors.values()), errors


def test_a_second_run_with_a_held_tag_stops_at_once(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    # the first run trains far longer than the test needs: it holds the lock until it is killed
    first = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *_train_args(tiny_model_dir, out, "2e-3"),
                              "--max_steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / f".{NAME}.lock").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        second = run_train(_train_args(tiny_model_dir, out, "5e-3"))
        assert first.poll() is None  # still holding its lock
        assert second.returncode != 0
        assert second.stderr.strip().splitlines()[-1].startswith(f"error: output {out / NAME} is being written by "
                                                                 f"PID {first.pid}")
        assert "trainable params" not in second.stderr and " on cpu: " not in second.stderr  # refused before any weights load
        assert "held-out rows" not in second.stderr  # and before its data is read
    finally:
        first.kill()
        first.wait()
    assert not (out / NAME).exists()  # nothing the second run did looks finished


def test_a_run_refused_after_its_claim_leaves_nothing_behind(tiny_model_dir, tmp_path):
    """The name is claimed before the data is read; a run refused then (here: a broken data file) gives the name
    back and removes the OUTPUT_ROOT it created; a dry run claims and writes nothing."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "1+1", "generated_solution"\n')
    root = tmp_path / "new" / "outputs"
    result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={broken}", f"--OUTPUT_ROOT={root}",
                        *FAST_TRAIN_ARGS])
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert str(broken) in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "new").exists()
    result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={root}",
                        "--dry_run=true", *FAST_TRAIN_ARGS])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "new").exists()


KILL_BEFORE_RENAME = """
import os, runpy, signal, sys
from qlora.outputs import run_dir as run_dir
run_dir.RunDir.publish = lambda self: os.kill(os.getpid(), signal.SIGKILL)  # dies between mark_staged and the rename
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_killed_before_the_rename_is_published_by_the_rerun_without_training(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = _train_args(tiny_model_dir, out, "2e-3")
    wrapper = KILL_BEFORE_RENAME.format(root=str(ROOT), script=str(TRAIN_SCRIPT))
    killed = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    staging = out / f".{NAME}.partial"
    assert (staging / STAGED_MARKER).is_file() and not (out / NAME).exists()
    rerun = run_train(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "publishing it without training" in rerun.stderr and "train    |" not in rerun.stderr
    assert json.loads((out / NAME / "metadata.json").read_text())["training"]["steps"] == 12
    assert sorted(p.name for p in out.iterdir()) == [NAME]
