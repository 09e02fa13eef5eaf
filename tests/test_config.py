"""The --NAME=value override mechanism and config validation; bad input fails before any weights load."""

import json
import shutil

import pytest

from qlora.core.errors import ConfigError
from qlora.config import apply_overrides, resolve_config, training_defaults, validate_config
from conftest import OPENMATH_SAMPLE, TRAIN_SCRIPT, run_python, run_train

DEFAULTS = {"lora_r": 256, "learning_rate": 2e-4, "merge_after_train": True, "target_modules": ["q_proj"],
            "MODEL_NAME": "Qwen/Qwen3-0.6B", "DATASET_PATH": None}


def test_overrides_are_typed_like_their_defaults():
    cfg = apply_overrides(DEFAULTS, ["--lora_r=64", "--learning_rate=1e-4", "--merge_after_train=false",
                                     "--target_modules=q_proj,v_proj", "--DATASET_PATH=data.jsonl"],
                          {"DATASET_PATH": str})
    assert cfg["lora_r"] == 64 and cfg["learning_rate"] == 1e-4 and cfg["merge_after_train"] is False
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["DATASET_PATH"] == "data.jsonl"
    assert apply_overrides(cfg, ["--DATASET_PATH=None"], {"DATASET_PATH": str})["DATASET_PATH"] is None


@pytest.mark.parametrize("arg, message", [
    ("--lora_rank=8", "unknown constant 'lora_rank'; allowed: lora_r, learning_rate"),
    ("--lora_r=eight", "--lora_r='eight' is not an integer"),
    ("--merge_after_train=maybe", "is not true or false"),
    ("lora_r=8", "is not of the form --NAME=value"),
    ("--lora_r", "is not of the form --NAME=value"),
])
def test_bad_overrides_name_what_is_allowed(arg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(DEFAULTS, [arg])


def _no_weights_model(tiny_model_dir, tmp_path):
    """A model dir with config and tokenizer but no weights: any weight load would fail loudly."""
    model = tmp_path / "Qwen3-0.6B"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    return model


@pytest.mark.parametrize("override, message", [
    ("--lora_r_typo=3", "unknown constant 'lora_r_typo'"),
    ("--QUANT_METHOD=INT3", "QUANT_METHOD='INT3' is not a training method; allowed: QLORA, NONE"),
    ("--lora_r=0", "lora_r=0 must be an integer > 0"),
    ("--lora_r=-4", "lora_r=-4 must be an integer > 0"),
    ("--DATASET_CHOICE=imagenet", "DATASET_CHOICE='imagenet' is unknown; allowed: openmath, squad, messages, prompt_completion, text"),
    ("--per_device_train_batch_size=0", "per_device_train_batch_size=0 must be an integer > 0"),
    ("--keep_lm_head_fp16=true", "keep_lm_head_fp16=True needs merge_after_train=True"),
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps=0 must be an integer > 0"),
    ("--save_steps=0", "save_steps=0 must be an integer > 0"),
    ("--keep_checkpoints=0", "keep_checkpoints=0 must be an integer > 0"),
    ("--if_output_exists=overwrite", "if_output_exists='overwrite' is unknown; allowed: refuse, suffix"),
    ("--RESUME=sometimes", "RESUME='sometimes' is not auto, never or an existing checkpoint directory"),
    ("--learning_rate=inf", "learning_rate=inf must be a finite number > 0"),
    ("--seed=-1", "seed=-1 must be an integer >= 0"),
    ("--PEFT_CONFIG=Full", "PEFT_CONFIG=Full needs QUANT_METHOD=NONE: 4-bit weights cannot be trained themselves"),
    ("--full_weights_dtype=fp16", "full_weights_dtype='fp16' is unknown; allowed: bf16, fp32"),
    ("--full_weights_dtype=fp32", "full_weights_dtype=fp32 needs PEFT_CONFIG=Full"),
    ("--bnb_4bit_quant_storage=int4",
     "bnb_4bit_quant_storage='int4' is unknown; allowed: auto, uint8, bfloat16, float16, float32"),
])
def test_invalid_config_is_one_line_naming_what_is_allowed(override, message):
    extra = ["--merge_after_train=false"] if "keep_lm_head" in override else []
    with pytest.raises(ConfigError) as raised:
        resolve_config(training_defaults(), [*extra, override])
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_bad_constant_is_refused_before_the_training_stack_imports():
    # the answer to a typo comes at once, not after torch, transformers and trl have loaded (seconds)
    code = f"""
import runpy, sys
main = runpy.run_path({str(TRAIN_SCRIPT)!r})["main"]
try:
    main(["--lora_r=0"])
except SystemExit as exit:
    print(exit)
print("imported:", sorted(set(sys.modules) & {{"torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate"}}))
"""
    result = run_python(code, timeout=60)
    assert result.stdout.splitlines() == ["error: lora_r=0 must be an integer > 0", "imported: []"], result.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("--max_seq_length=100000", "max_seq_length=100000 exceeds the model's context of 2048 tokens"),
    ("--DATASET_PATH=/nonexistent/rows.jsonl", "DATASET_PATH /nonexistent/rows.jsonl does not exist"),
    ("--RESUME={tmp}", "RESUME='{tmp}' is not a complete checkpoint: no checkpoint_complete.json"),
])
def test_invalid_input_stops_the_script_before_loading_with_one_line(override, message, tiny_model_dir, tmp_path):
    model = _no_weights_model(tiny_model_dir, tmp_path)
    override, message = override.format(tmp=tmp_path), message.format(tmp=tmp_path)
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={model}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}", override])
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "model.safetensors" not in result.stderr  # failed on the input, not on the missing weights
    assert not out.exists() or not any(out.iterdir())


def test_unknown_target_module_names_the_existing_ones_before_loading_and_writes_nothing(tiny_model_dir, tmp_path):
    model = _no_weights_model(tiny_model_dir, tmp_path)  # any weight load would fail on its own
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={model}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
                        "--target_modules=q_proj,qkv_proj"])
    assert result.returncode != 0
    assert "model.safetensors" not in result.stderr and " data " not in result.stderr  # refused before the data too
    assert result.stderr.strip().splitlines()[-1] == (
        "error: target module 'qkv_proj' matches no Linear module; this model has: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert not out.exists() or not any(out.iterdir())


def test_dataset_file_missing_schema_columns(tiny_model_dir, tmp_path):
    model = _no_weights_model(tiny_model_dir, tmp_path)
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={model}", f"--DATASET_PATH={bad}", f"--OUTPUT_ROOT={out}"])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {bad} row 1: 'problem' is missing (the openmath format needs problem, generated_solution, "
        "expected_answer)")
    assert not out.exists() or not any(out.iterdir())


def test_shipped_defaults_validate():
    validate_config(training_defaults())


def test_quant_method_is_read_in_any_case_and_spelled_once():
    """QUANT_METHOD is case-insensitive (QuantMethod.parse): the combinations that depend on it read the method,
    not its spelling, and the resolved config spells it the one way metadata and tags use."""
    cfg = resolve_config(training_defaults(), ["--QUANT_METHOD=none", "--PEFT_CONFIG=Full"])
    assert cfg["QUANT_METHOD"] == "NONE"
    assert resolve_config(training_defaults(), ["--QUANT_METHOD=qlora", "--init_lora_weights=loftq"])["QUANT_METHOD"] == "QLORA"
    with pytest.raises(ConfigError, match="PEFT_CONFIG=Full needs QUANT_METHOD=NONE"):
        resolve_config(training_defaults(), ["--QUANT_METHOD=qlora", "--PEFT_CONFIG=Full"])
