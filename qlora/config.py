"""`--NAME=value` overrides of a script's constants, and validation of the resolved training config.

One mechanism, strict: an unknown name, a malformed argument or a value of the wrong type is a
`ConfigError` with one line saying what is wrong and what is allowed. Values are parsed, never
evaluated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from qlora.core.errors import ConfigError
from qlora.core.files import REPO_ROOT
from qlora.data.formats import DATASETS, NEEDS_PATH, resolve_source
from qlora.merge.weights import MergeBase
from qlora.model.loading import read_model_config
from qlora.outputs.run_dir import IF_EXISTS_POLICIES
from qlora.outputs.write import MergedPrecision
from qlora.planner.memory import parse_memory_limit
from qlora.train.distributed import LaunchContext, QUANT_STORAGE_CHOICES, check_launch
from qlora.train.options import OPTIMIZERS, check_report_to
from qlora.train.peft import FullWeightsDtype, LORA_INITS, PeftKind, check_target_modules_before_loading
from quantization_utils import QuantMethod


TRAIN_SCRIPT = REPO_ROOT / "Fine-tuning" / "01_Train.py"
# The type of each training constant whose default is None (it then also accepts None).
OPTIONAL_TYPES = {"DATASET_PATH": str}

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}

def _parse_value(name: str, text: str, kind: type, optional: bool) -> Any:
    if optional and text in ("None", "none", ""):
        return None
    try:
        if kind is bool:
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            return low in _TRUE
        if kind is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        if kind is float:
            return float(text)
        return kind(text)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number", list: "a comma-separated list",
                    str: "a string"}[kind]
        raise ConfigError(f"--{name}={text!r} is not {expected}" + (" (or None)" if optional else "")) from None

def apply_overrides(defaults: Mapping[str, Any], argv: list[str],
                    optional_types: Mapping[str, type] | None = None) -> dict[str, Any]:
    """Return `defaults` with each `--NAME=value` of `argv` applied, typed like the default.

    A constant whose default is None takes its type from `optional_types` and also accepts `None`.
    """
    optional_types = dict(optional_types or {})
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --NAME=value")
        name, text = arg[2:].split("=", 1)
        if name not in defaults:
            raise ConfigError(f"unknown constant {name!r}; allowed: {', '.join(defaults)}")
        default = defaults[name]
        optional = default is None or name in optional_types
        kind = optional_types.get(name) or type(default)
        if kind is None or kind is type(None):
            raise ConfigError(f"constant {name!r} has no declared type")
        config[name] = _parse_value(name, text, kind, optional)
    return config

def training_defaults() -> dict[str, Any]:
    """Fine-tuning/01_Train.py's constants as they stand in its fenced block (the script is read, not run)."""
    import runpy

    namespace = runpy.run_path(str(TRAIN_SCRIPT), run_name="training_constants")
    return {name: namespace[name] for name in namespace["CONFIG_NAMES"]}

def resolve_config(defaults: Mapping[str, Any], argv: list[str]) -> dict[str, Any]:
    """The run's config: defaults with the command line's overrides, validated."""
    cfg = apply_overrides(defaults, argv, OPTIONAL_TYPES)
    validate_config(cfg)
    cfg["QUANT_METHOD"] = QuantMethod.parse(cfg["QUANT_METHOD"]).value  # one spelling from here on: QLORA | NONE
    resolve_source(cfg["DATASET_CHOICE"], cfg["DATASET_PATH"])  # a data file that exists, or a hub id; not read yet
    return cfg

def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_POSITIVE_INT = ("an integer > 0", lambda v: _integer(v) and v > 0)
# Every numeric constant of Fine-tuning/01_Train.py: (what is allowed, in words; the test). nan and inf never pass.
NUMERIC_RANGES = {
    **{name: _POSITIVE_INT for name in ("lora_r", "lora_alpha", "per_device_train_batch_size",
                                        "gradient_accumulation_steps", "max_seq_length", "max_train_samples",
                                        "save_steps", "logging_steps", "keep_checkpoints")},
    "eval_samples": ("an integer >= 0", lambda v: _integer(v) and v >= 0),
    "seed": ("an integer >= 0 (and < 2**32)", lambda v: _integer(v) and 0 <= v < 2**32),  # numpy's seed range
    "max_steps": ("an integer > 0, or -1 to run num_train_epochs", lambda v: _integer(v) and (v > 0 or v == -1)),
    "learning_rate": ("a finite number > 0", lambda v: _finite(v) and v > 0),
    "lora_dropout": ("a finite number in [0, 1)", lambda v: _finite(v) and 0 <= v < 1),
    "num_train_epochs": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),  # > 0 when max_steps is -1
    "merge_check_max_kl": ("a finite number >= 0 (a mean KL divergence; 0 flags any difference)",
                           lambda v: _finite(v) and v >= 0),
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)

def _one_of(cfg: Mapping[str, Any], name: str, allowed) -> None:
    """`cfg[name]` is one of `allowed` (an enum or a collection of words), when the config has that constant."""
    if name in cfg:
        words = [str(value) for value in allowed]
        _require(cfg[name] in words, f"{name}={cfg[name]!r} is unknown; allowed: {', '.join(words)}")


def _validate_lora_init(cfg: Mapping[str, Any], method: QuantMethod) -> None:
    _one_of(cfg, "init_lora_weights", LORA_INITS)
    if cfg["init_lora_weights"] != "loftq":
        return
    _require(method is QuantMethod.QLORA and cfg["PEFT_CONFIG"] == PeftKind.LORA,
             "init_lora_weights=loftq needs QUANT_METHOD=QLORA and PEFT_CONFIG=LoRa: it starts the LoRA adapter at "
             "the 4-bit base's quantization error")
    _require(cfg["merge_base"] != "original",
             "merge_base=original with init_lora_weights=loftq would add the quantization error twice (the adapter "
             "already corrects it); allowed: dequantized, auto")

def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check a resolved training config before anything loads: types, ranges and combinations."""
    try:
        method = QuantMethod.parse(cfg["QUANT_METHOD"])  # any case: compared as the method from here on
    except ValueError:
        raise ConfigError(
            f"QUANT_METHOD={cfg['QUANT_METHOD']!r} is not a training method; allowed: QLORA, NONE"
        ) from None
    _require(method in (QuantMethod.QLORA, QuantMethod.NONE),
             f"QUANT_METHOD={cfg['QUANT_METHOD']!r} is a post-training method (tools/quantize.py); "
             "allowed here: QLORA, NONE")
    _require(cfg["DATASET_CHOICE"] in DATASETS,
             f"DATASET_CHOICE={cfg['DATASET_CHOICE']!r} is unknown; allowed: {', '.join(DATASETS)}")
    _require(not DATASETS[cfg["DATASET_CHOICE"]].needs_path or cfg.get("DATASET_PATH") is not None,
             f"DATASET_CHOICE={cfg['DATASET_CHOICE']} {NEEDS_PATH}")
    _one_of(cfg, "PEFT_CONFIG", PeftKind)
    _validate_lora_init(cfg, method)
    _require(cfg["PEFT_CONFIG"] != PeftKind.FULL or method is QuantMethod.NONE,
             f"PEFT_CONFIG=Full needs QUANT_METHOD=NONE: 4-bit weights cannot be trained themselves "
             f"(QUANT_METHOD={cfg['QUANT_METHOD']} trains LoRa or DoRa adapters on them)")
    if "full_weights_dtype" in cfg:
        _one_of(cfg, "full_weights_dtype", FullWeightsDtype)
        _require(cfg["full_weights_dtype"] == "bf16" or cfg["PEFT_CONFIG"] == PeftKind.FULL,
                 f"full_weights_dtype={cfg['full_weights_dtype']} needs PEFT_CONFIG=Full: it is the dtype full "
                 "fine-tuning trains the weights in (LoRa and DoRa train adapters over a frozen base)")
    for name, (allowed, accepts) in NUMERIC_RANGES.items():
        if name in cfg:
            _require(accepts(cfg[name]), f"{name}={cfg[name]!r} must be {allowed}")
    for name, value in cfg.items():  # a float constant added without a range of its own is still checked
        _require(not isinstance(value, float) or math.isfinite(value), f"{name}={value!r} must be a finite number")
    _require(cfg["max_steps"] > 0 or cfg["num_train_epochs"] > 0,
             f"num_train_epochs={cfg['num_train_epochs']!r} must be > 0 when max_steps is -1")
    _require(len(cfg["target_modules"]) > 0, "target_modules is empty; give module names such as q_proj,v_proj")
    _require(cfg["optim"] in OPTIMIZERS, f"optim={cfg['optim']!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
    _one_of(cfg, "merge_base", MergeBase)
    _require(not cfg["merge_after_train"] or cfg["eval_samples"] > 0,
             "merge_after_train=True needs eval_samples > 0: the merge check runs on held-out rows")
    _one_of(cfg, "merged_precision", MergedPrecision)
    _one_of(cfg, "bnb_4bit_quant_storage", QUANT_STORAGE_CHOICES)
    _require(cfg["merged_precision"] == "bf16" or (cfg["merge_after_train"] and method is QuantMethod.QLORA
                                                   and cfg["PEFT_CONFIG"] != PeftKind.FULL),
             "merged_precision=nf4 needs merge_after_train=True and QUANT_METHOD=QLORA (a 4-bit artifact under a w4 tag)")
    _require(not (cfg["keep_lm_head_fp16"] and not cfg["merge_after_train"]),
             "keep_lm_head_fp16=True needs merge_after_train=True: an adapter-only output has no head of its own")
    _require(cfg["OUTPUT_ROOT"] != "", "OUTPUT_ROOT is empty; give a directory")
    _one_of(cfg, "if_output_exists", IF_EXISTS_POLICIES)
    if "memory_limit_gb" in cfg:

        parse_memory_limit(cfg["memory_limit_gb"])
    if "report_to" in cfg:
        check_report_to(cfg["report_to"])
    if "RESUME" in cfg:
        _require(cfg["RESUME"] in ("auto", "never") or Path(cfg["RESUME"]).is_dir(),
                 f"RESUME={cfg['RESUME']!r} is not auto, never or an existing checkpoint directory")


def check_model_before_loading(cfg: Mapping[str, Any], launch: LaunchContext) -> dict[str, Any]:
    """The checks that need the model's config.json (no weights): the sequence length fits its context, the
    launch suits the config, target_modules match its layers (built on the meta device). Returns the model's
    text config, which the memory plan reads."""
    model_config = read_model_config(cfg["MODEL_NAME"], cfg["max_seq_length"], cfg["trust_remote_code"])
    check_launch(launch, cfg)
    check_target_modules_before_loading(cfg)
    return model_config
