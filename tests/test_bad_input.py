"""Nothing runs or escapes that the user did not ask for, and every bad input is one clear line.

Remote code shipped in a directory, names read from a file, non-finite constants and losses, corrupt
checkpoints, pickle weights, broken data and metadata files, a full disk, unfinished runs."""

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from qlora.outputs.read import load_output_dir
from qlora.core.files import write_json
from qlora.train.checkpoints import MARKER, checkpoint_problem, write_marker
from qlora.core.errors import ConfigError
from qlora.config import training_defaults, validate_config
from conftest import FAST_TRAIN_ARGS, OPENMATH_SAMPLE, run_train
from qlora.core.errors import UserError
from qlora.core.files import explain_disk_full
from qlora.model.loading import load_causal_lm
from quantization_utils import base_model_name, build_metadata, build_quantization_plan, output_dir_name, safe_name_part
from tools.evaluate import main as evaluate
from tools.quantize import main as quantize
from qlora.train.callbacks import NonFiniteLossError

OUTPUT_NAME = "Qwen3-0.6B-openmath_SFT_LoRa8_QLORA_w4_headbf16"


def output_metadata(**overrides) -> dict:
    """metadata.json of a merged QLoRA run of the tiny model, as 01_Train.py writes it."""
    spec, _ = build_quantization_plan("QLORA", lora_r=8, merge_after_train=True)
    fields = dict(base_model="Qwen/Qwen3-0.6B", peft="LoRa8",
                  dataset={"name": "openmath", "path": str(OPENMATH_SAMPLE), "train_rows": 36, "eval_rows": 4,
                           "split_seed": 42},
                  artifact={"kind": "merged_bf16", "primary": "merged"},
                  config={"max_train_samples": 36, "eval_samples": 4, "trust_remote_code": False})
    return build_metadata(spec, **{**fields, **overrides})


# ----- 1. remote code runs only when the user passes --trust-remote-code --------------------------------

def remote_code_dir(tiny_model_dir, root, trusted_in_metadata: bool):
    """A merged output whose config.json maps the model to a shipped modeling file that writes a marker when
    imported. Returns (directory, marker)."""
    directory = root / OUTPUT_NAME
    shutil.copytree(tiny_model_dir, directory)
    marker = root / "remote_code_ran"
    (directory / "modeling_shipped.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import Qwen3ForCausalLM\n\n\nclass ShippedForCausalLM(Qwen3ForCausalLM):\n    pass\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    meta = output_metadata()
    meta["config"]["trust_remote_code"] = trusted_in_metadata
    (directory / "metadata.json").write_text(json.dumps(meta))
    return directory, marker


def test_metadata_saying_trust_remote_code_is_refused_and_nothing_runs(tiny_model_dir, tmp_path):
    directory, marker = remote_code_dir(tiny_model_dir, tmp_path, trusted_in_metadata=True)
    with pytest.raises(SystemExit) as raised:
        evaluate([str(directory), "--limit=1", "--max-new-tokens=2", f"--chart={tmp_path / 'chart.png'}"])
    assert str(raised.value.code) == (
        f"error: {directory} comes from a model that runs Python code shipped with it (its metadata.json says "
        "trust_remote_code=True); pass --trust-remote-code if you trust its source")
    with pytest.raises(UserError, match="pass --trust-remote-code"):
        load_output_dir(directory)
    with pytest.raises(SystemExit, match="^error: .*pass --trust-remote-code if you trust its source$"):
        quantize(["--model", str(directory), "--method", "BNB_NF4", "--out-root", str(tmp_path / "out")])
    assert not marker.exists() and not (directory / "eval_results.json").exists() and not (tmp_path / "out").exists()


def test_shipped_code_is_not_run_when_loading_without_the_flag(tiny_model_dir, tmp_path):
    """auto_map for a model type transformers knows: the directory loads with transformers' own class."""
    directory, marker = remote_code_dir(tiny_model_dir, tmp_path, trusted_in_metadata=False)
    [result] = evaluate([str(directory), "--limit=1", "--max-new-tokens=2", f"--chart={tmp_path / 'chart.png'}"])
    assert result["load_kind"] == "merged" and result["rows"] == 1
    assert not marker.exists()


def test_the_flag_does_run_the_shipped_code(tiny_model_dir, tmp_path):
    """The control: the crafted directory really carries code that runs when trusted (in a fresh process,
    with transformers' module cache under tmp_path)."""
    directory, marker = remote_code_dir(tiny_model_dir, tmp_path, trusted_in_metadata=True)
    code = (f"from qlora.outputs.read import load_output_dir; "
            f"model, _, _ = load_output_dir({str(directory)!r}, 'cpu', trust_remote_code=True); "
            "print(type(model).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ShippedForCausalLM" and marker.read_text() == "ran"


# ----- 2. names read from a file cannot steer a sibling out of --out-root ----------------------------------

def test_name_parts_are_sanitized():
    assert safe_name_part("../../etc") == "etc"
    assert safe_name_part("LoRa8/../../x") == "LoRa8-..-..-x"
    assert safe_name_part(".hidden name") == "hidden-name"
    with pytest.raises(ValueError, match="cannot make a directory name from '..'"):
        safe_name_part("..")
    spec, _ = build_quantization_plan("QLORA", lora_r=8)
    assert output_dir_name("Qwen/Qwen3-0.6B", "../../x", "LoRa8/../y", spec, stage="SFT/..") == \
        "Qwen3-0.6B-x_SFT_LoRa8-..-y_QLORA_w4_headbf16"


def test_base_model_name_of_a_local_path_is_its_resolved_directory(tmp_path, monkeypatch):
    (tmp_path / "models" / "X").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_model_name("models/X/.") == "X"
    assert base_model_name("models/X/") == "X"
    assert base_model_name("models/X/sub/..") == "X"  # lexically, where the path does not exist
    assert base_model_name("Qwen/Qwen3-0.6B") == "Qwen3-0.6B"
    assert base_model_name("C:\\models\\Llama-3.2-1B") == "Llama-3.2-1B"
    monkeypatch.chdir(tmp_path / "models" / "X")
    assert base_model_name(".") == "X"


def test_quantize_keeps_a_sibling_named_by_hostile_metadata_inside_out_root(tiny_model_dir, tmp_path):
    source = tmp_path / "src" / "model"
    shutil.copytree(tiny_model_dir, source)
    meta = output_metadata(base_model="../../../../escaped", peft="../../../../escaped",
                           dataset={"name": "../../../../escaped", "path": None})
    (source / "metadata.json").write_text(json.dumps(meta))
    out_root = tmp_path / "a" / "b" / "out"
    sibling = quantize(["--model", str(source), "--method", "BNB_NF4", "--out-root", str(out_root)])
    assert sibling.parent == out_root and sibling.name == "escaped-escaped_SFT_escaped_BNBNF4_w4_headbf16"
    assert sorted(p.name for p in out_root.iterdir()) == [sibling.name]
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(source) and not p.is_relative_to(out_root)
               and p not in out_root.parents and p not in source.parents]
    assert outside == []


# ----- 3. non-finite values ---------------------------------------------------------------------------------

BAD_CONSTANTS = {
    "learning_rate": (math.inf, "learning_rate=inf must be a finite number > 0"),
    "learning_rate nan": (math.nan, "learning_rate=nan must be a finite number > 0"),
    "num_train_epochs": (math.inf, "num_train_epochs=inf must be a finite number >= 0"),
    "merge_check_max_kl": (-1.0, "merge_check_max_kl=-1.0 must be a finite number >= 0"),
    "merge_check_max_kl nan": (math.nan, "merge_check_max_kl=nan must be a finite number >= 0"),
    "lora_dropout": (math.nan, "lora_dropout=nan must be a finite number in [0, 1)"),
    "seed": (-1, "seed=-1 must be an integer >= 0"),
    "max_steps": (0, "max_steps=0 must be an integer > 0, or -1 to run num_train_epochs"),
    "eval_samples": (-3, "eval_samples=-3 must be an integer >= 0"),
    "lora_r": (True, "lora_r=True must be an integer > 0"),
}


@pytest.mark.parametrize("case", BAD_CONSTANTS)
def test_bad_numeric_constant_names_itself_and_the_allowed_range(case):
    value, message = BAD_CONSTANTS[case]
    cfg = {**training_defaults(), case.split()[0]: value}
    with pytest.raises(ConfigError) as raised:
        validate_config(cfg)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_write_json_refuses_nan_and_replaces_atomically(tmp_path):
    path = tmp_path / "metadata.json"
    write_json(path, {"a": 1})
    with pytest.raises(ValueError, match=r"not a finite number: training\.eval_loss=nan"):
        write_json(path, {"training": {"eval_loss": math.nan}})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    write_json(path, {"b": [1.5, "x"]})
    assert json.loads(path.read_text()) == {"b": [1.5, "x"]} and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_non_finite_loss_stops_training_before_saving_that_step(tiny_model_dir, tmp_path):
    """A real SFTTrainer on the tiny model, checkpointing every step; from the third step its lm_head emits
    nan (as a diverged model does): the run stops at step 3, checkpoints 1 and 2 stay complete."""
    from qlora.data.formats import load_rows, to_sft_dataset
    from qlora.model.loading import load_tokenizer
    from qlora.train.trainer import build_trainer
    from qlora.train.peft import prepare_for_training

    cfg = {**training_defaults(), "lora_r": 8, "max_steps": 5, "save_steps": 1, "keep_checkpoints": 5,
           "logging_steps": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
           "max_seq_length": 64, "gradient_checkpointing": False, "optim": "adamw_torch", "PEFT_CONFIG": "LoRa"}
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = prepare_for_training(load_causal_lm(str(tiny_model_dir), None, "cpu"), cfg, quantized=False)
    data = to_sft_dataset(load_rows("openmath", OPENMATH_SAMPLE, 20), "openmath")
    checkpoints = tmp_path / "checkpoints"
    trainer = build_trainer(model, tokenizer, cfg, data, None, checkpoints, "cpu")  # its callbacks: marker, non-finite
    embeddings = model.get_input_embeddings()  # TRL's fused loss reads lm_head's weight without calling it
    embeddings.register_forward_hook(lambda module, args, out: out * math.nan if trainer.state.global_step >= 2 else out)
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.train()
    assert str(raised.value).startswith("training loss is nan at step 3: training diverged")
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(checkpoint_problem(checkpoints / name) is None for name in ("checkpoint-1", "checkpoint-2"))


# ----- 4. a checkpoint whose bytes changed after the save ---------------------------------------------------

def test_zero_filled_file_of_the_right_size_fails_its_checksum(tmp_path):
    directory = tmp_path / "checkpoint-4"
    directory.mkdir()
    (directory / "optimizer.pt").write_bytes(os.urandom(4096))
    write_marker(directory, 4, {"learning_rate": 1e-3})
    assert checkpoint_problem(directory) is None
    (directory / "optimizer.pt").write_bytes(bytes(4096))
    assert checkpoint_problem(directory) == (
        "optimizer.pt does not match the sha256 taken when it was saved (changed or corrupted since)")
    record = json.loads((directory / MARKER).read_text())["files"]["optimizer.pt"]
    assert record["bytes"] == 4096 and len(record["sha256"]) == 64


# ----- 5. one line instead of a traceback ---------------------------------------------------------------

def pickle_only_copy(model_dir, tmp_path):
    """A copy of a model directory whose weights are a pickle file (pytorch_model.bin) only."""
    directory = tmp_path / "Qwen3-0.6B"
    shutil.copytree(model_dir, directory)
    from safetensors.torch import load_file

    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


def test_pickle_only_model_directory_is_refused_before_loading(tiny_model_dir, tmp_path):
    directory = pickle_only_copy(tiny_model_dir, tmp_path)
    with pytest.raises(UserError, match=r"has only pickle weights \(pytorch_model.bin\); safetensors is required "
                                        "because loading a pickle can run code hidden in it"):
        load_causal_lm(str(directory), None, "cpu")


# What each writer raised when a 256 KiB tmpfs filled up (measured: torch 2.13, safetensors, Python 3.11).
DISK_FULL_ERRORS = {
    "python": OSError(errno.ENOSPC, "No space left on device"),
    "safetensors": RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
}


@pytest.mark.parametrize("writer", DISK_FULL_ERRORS)
def test_disk_full_is_explained_with_the_size_needed(writer, tmp_path):
    needed = 10**18  # more than any disk has free: torch.save's error (no errno) counts only then
    error = explain_disk_full(DISK_FULL_ERRORS[writer], needed, tmp_path)
    assert isinstance(error, UserError) and "\n" not in str(error)
    assert str(error).startswith(f"the disk under {tmp_path} is full: saving needs ~931322574.62 GiB free there, ")
    assert str(error).endswith("free some space, then rerun the same command: it resumes from the last complete "
                               "checkpoint")


def test_an_error_during_a_progress_bar_is_a_line_of_its_own():
    """A failure while a progress bar is drawn (a disk filling up during a save) ends the bar's line first."""
    result = subprocess.run([sys.executable, "-c", "from tqdm import tqdm\n"
                             "from qlora.core.errors import UserError, one_line_errors\n"
                             "with one_line_errors():\n"
                             "    bar = tqdm(total=10, desc='saving')\n"
                             "    bar.update(3)\n"
                             "    raise UserError('the disk is full')\n"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == "error: the disk is full"


def test_other_save_failures_are_not_called_disk_full(tmp_path):
    assert explain_disk_full(DISK_FULL_ERRORS["torch.save"], 1, tmp_path) is None  # the space is there
    assert explain_disk_full(OSError(errno.EIO, "Input/output error"), 10**18, tmp_path) is None
    assert explain_disk_full(ValueError("shape mismatch"), 10**18, tmp_path) is None


# ----- 5 and 6: evaluate and quantize, table-driven: exit code, one `error:` line, nothing written ----------

def make_dir(kind, tiny_model_dir, tmp_path):
    """The directory a case passes to the tool."""
    if kind == "model":
        return tiny_model_dir
    directory = tmp_path / {"staging": f".{OUTPUT_NAME}.partial"}.get(kind, OUTPUT_NAME)
    shutil.copytree(tiny_model_dir, directory)
    meta = output_metadata()
    if kind in ("staging", "checkpoints"):
        (directory / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    if kind == "pickle":
        (directory / "pytorch_model.bin").write_bytes((directory / "model.safetensors").read_bytes())
        (directory / "model.safetensors").unlink()
    if kind == "cut-metadata":
        (directory / "metadata.json").write_text(json.dumps(meta)[:40])
    if kind == "latin1-metadata":
        (directory / "metadata.json").write_bytes(json.dumps(meta).replace("Qwen", "Qw\u00e9n").encode("latin-1"))
    if kind == "fieldless-metadata":
        del meta["base_model"]
        meta["artifact"] = {"kind": "adapter_only"}
        (directory / "metadata.json").write_text(json.dumps(meta))
    if kind == "remote-code":
        meta["config"]["trust_remote_code"] = True
        (directory / "metadata.json").write_text(json.dumps(meta))
    return directory


def data_file(kind, tmp_path):
    names = {"cut-json": "rows.jsonl", "latin1": "rows.jsonl", "empty": "rows.jsonl", "cut-array": "rows.json",
             "missing": "gone.jsonl", "txt": "rows.txt"}
    path = tmp_path / names[kind]
    row = json.dumps({"problem": "What is 2+2?", "generated_solution": "4", "expected_answer": "4"}) + "\n"
    rows = row * 70  # more than evaluate's default held-out split of 64
    content = {"cut-json": (rows + row[:30]).encode(), "latin1": rows.replace("What", "Wh\u00e4t").encode("latin-1"),
               "empty": b"", "cut-array": ("[" + rows.replace("\n", ",")).encode(), "txt": rows.encode()}
    if kind in content:
        path.write_bytes(content[kind])
    return path


UNFINISHED = "is an unfinished run: rerun the same training command to finish it, or remove it"
# case: (tool, directory kind, data file kind or None, extra args, expected text of the error line)
TOOL_CASES = {
    "evaluate staging dir": ("evaluate", "staging", None, [], UNFINISHED),
    "evaluate checkpoints only": ("evaluate", "checkpoints", None, [], UNFINISHED),
    "evaluate pickle weights": ("evaluate", "pickle", None, [], "has only pickle weights (pytorch_model.bin)"),
    "evaluate cut metadata": ("evaluate", "cut-metadata", None, [],
                              "metadata.json is not valid JSON (Unterminated string starting at: line 1 column 40"),
    "evaluate latin-1 metadata": ("evaluate", "latin1-metadata", None, [], "metadata.json is not UTF-8 text (byte"),
    "evaluate metadata field": ("evaluate", "fieldless-metadata", None, [],
                                "metadata.json: a field is missing or malformed (KeyError: 'base_model')"),
    "evaluate remote code": ("evaluate", "remote-code", None, [], "pass --trust-remote-code if you trust its source"),
    "evaluate cut jsonl": ("evaluate", "model", "cut-json", [],
                           "rows.jsonl line 71 is not valid JSON: Unterminated string starting at (column 29)"),
    "evaluate latin-1 jsonl": ("evaluate", "model", "latin1", [],
                               "rows.jsonl line 1 is not valid UTF-8 (byte 0xe4 at column 16)"),
    "evaluate empty jsonl": ("evaluate", "model", "empty", [], "rows.jsonl has no rows (the file is empty)"),
    "evaluate cut json": ("evaluate", "model", "cut-array", [], "rows.json line 1 is not valid JSON: "),
    "evaluate missing file": ("evaluate", "model", "missing", [], "gone.jsonl does not exist"),
    "evaluate wrong extension": ("evaluate", "model", "txt", [], "has an unsupported extension"),
    "quantize staging dir": ("quantize", "staging", None, [], UNFINISHED),
    "quantize checkpoints only": ("quantize", "checkpoints", None, [], UNFINISHED),
    "quantize pickle weights": ("quantize", "pickle", None, [], "safetensors is required"),
    "quantize cut metadata": ("quantize", "cut-metadata", None, [], "metadata.json is not valid JSON"),
    "quantize latin-1 metadata": ("quantize", "latin1-metadata", None, [], "metadata.json is not UTF-8 text"),
    "quantize remote code": ("quantize", "remote-code", None, [], "pass --trust-remote-code if you trust its source"),
    "quantize cut jsonl": ("quantize", "model", "cut-json", [], "{data} line 71 is not valid JSON: Unterminated string"),
    "quantize latin-1 jsonl": ("quantize", "model", "latin1", [], "{data} line 1 is not valid UTF-8 (byte 0xe4"),
    "quantize empty jsonl": ("quantize", "model", "empty", [], "{data} has no rows (the file is empty)"),
    "quantize missing file": ("quantize", "model", "missing", [], "gone.jsonl does not exist"),
}


@pytest.mark.parametrize("case", TOOL_CASES)
def test_tool_bad_input_is_one_error_line_and_writes_nothing(case, tiny_model_dir, tmp_path):
    tool, dir_kind, data_kind, extra, expected = TOOL_CASES[case]
    directory = make_dir(dir_kind, tiny_model_dir, tmp_path)
    data = data_file(data_kind, tmp_path) if data_kind else None
    out = tmp_path / "out"
    if tool == "evaluate":
        argv = [str(directory), "--limit=1", "--max-new-tokens=2", f"--chart={out / 'chart.png'}", *extra]
        argv += ["--dataset=openmath", f"--dataset-path={data}"] if data else []
        run = evaluate
    else:
        argv = ["--model", str(directory), "--out-root", str(out), *extra]
        argv += (["--method", "GPTQ", "--group-size", "64", "--calibration", "openmath", "--calibration-path", str(data)]
                 if data else ["--method", "BNB_NF4"])
        run = quantize
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as raised:
        run(argv)
    message = str(raised.value.code)  # SystemExit(str) exits with status 1, the message on stderr
    assert message.startswith("error: ") and "\n" not in message, message
    assert expected.format(data=data) in message, message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing half-written


# ----- the training script: each bad input one `error:` line, nothing finished-looking left -------------

TRAIN_CASES = {
    "output root is a file": (lambda model_dir, tmp: (tmp / "file").write_text("x") and [f"--OUTPUT_ROOT={tmp / 'file'}"],
                              "is a file, not a directory"),
    "pickle-only model": (lambda model_dir, tmp: [f"--MODEL_NAME={pickle_only_copy(model_dir, tmp)}"],
                          "safetensors is required"),
    "diverging learning rate": (lambda model_dir, tmp: ["--learning_rate=1e30"], "training diverged"),
    **{f"over-long {name}": (lambda model_dir, tmp, name=name: [f"--{name}={tmp / ('a' * 5000)}"], "File name too long")
       for name in ("OUTPUT_ROOT", "DATASET_PATH", "RESUME")},
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_training_bad_input_is_one_error_line_and_nothing_finished(case, tiny_model_dir, tmp_path):
    make_args, message = TRAIN_CASES[case]
    out = tmp_path / "out"
    args = [f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
            *FAST_TRAIN_ARGS, *make_args(tiny_model_dir, tmp_path)]
    result = run_train(args)
    errors = re.findall(r"(?:^|[\r\n\]])error: [^\r\n]*", result.stderr)  # a progress bar may end the line before it
    assert result.returncode == 1 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*/metadata.json")) and not [p for p in out.glob("*") if not p.name.startswith(".")]
