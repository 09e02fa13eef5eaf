"""Output directories as artifacts: reading a finished run back (merged model, adapter on its 4-bit base),
rebuilding the quantization plan it used, and the facts recorded about it (library versions)."""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qlora.core.errors import UserError
from qlora.model.loading import keep_4bit_weights_dequantizable, load_causal_lm, load_tokenizer
from qlora.outputs.run_dir import fsync_path

# The stack whose versions every output records: the seed's libraries, plus what a PTQ backend adds.
STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl")

def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the stack and of `extra` packages (a package not installed is left out)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in STACK + tuple(extra):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions

def absolute_if_local(name_or_path: str | None) -> str | None:
    """A path that exists here, made absolute (metadata is read from other directories); a hub id or None as is."""
    if name_or_path is None or not Path(name_or_path).exists():
        return name_or_path
    return str(Path(name_or_path).resolve())

# metadata["quantization"]["extras"] key -> build_quantization_plan option: how the 4-bit base was loaded
BASE_LOAD_EXTRAS = {"double_quant": "double_quant", "base_quant_type": "quant_type",
                    "compute_dtype": "compute_dtype", "quant_storage": "quant_storage"}

def base_load_extras(metadata: dict) -> dict:
    """The extras of a run's quantization block that say how its 4-bit base was loaded."""
    extras = (metadata.get("quantization") or {}).get("extras") or {}
    return {key: value for key, value in extras.items() if key in BASE_LOAD_EXTRAS}

def quantization_plan_from_metadata(metadata: dict):
    """The `(spec, BitsAndBytesConfig | None)` a run used, rebuilt from its metadata's quantization block."""
    from quantization_utils import build_quantization_plan

    block = metadata["quantization"]
    extras = dict(block.get("extras") or {})
    options = {"lora_r": extras.get("lora_r"), "merge_after_train": extras.get("merge_after_train", True)}
    options.update({BASE_LOAD_EXTRAS[key]: value for key, value in base_load_extras(metadata).items()})
    return build_quantization_plan(block["method"], lm_head_dtype=block["lm_head_dtype"], **options)

def saved_lm_head(directory: str | Path):
    """lm_head.weight as saved in a model directory's safetensors (its own dtype), or None when tied."""
    from qlora.merge.merge import checkpoint_reader

    try:
        return checkpoint_reader(str(directory))("lm_head.weight")
    except KeyError:
        return None

def load_merged_dir(directory: str | Path, quantization_config=None, device: str | None = None,
                    trust_remote_code: bool = False):
    """A merged model directory as `AutoModelForCausalLM.from_pretrained(directory)` loads it (the dtype
    its config names), placed on `device`, with one addition: an lm_head saved in another dtype than the
    model's (fp16) is kept in it, where plain `from_pretrained` casts it to the model's dtype.

    `quantization_config` re-quantizes the 16-bit weights on load (the NF4 artifact is made this way);
    a directory saved re-quantized carries its own quantization config and needs none.
    """
    import torch

    from qlora.merge.merge import set_lm_head_dtype

    model = load_causal_lm(str(directory), quantization_config, device, trust_remote_code, dtype="auto")
    head = saved_lm_head(directory)
    if head is not None and head.dtype != torch.bfloat16:
        set_lm_head_dtype(model, head.dtype, head)
    return model.eval()

def load_adapter_model(base_model: str, adapter_dir: str | Path, quantization_config=None, device: str | None = None,
                       trust_remote_code: bool = False):
    """The trained model: the adapter in `adapter_dir` on the base loaded by the same plan (4-bit for QLORA)."""
    from peft import PeftModel

    base = load_causal_lm(base_model, quantization_config, device, trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    keep_4bit_weights_dequantizable(model)
    return model

def load_output_dir(path: str | Path, device: str | None = None, trust_remote_code: bool = False):
    """Load any output directory of 01_Train.py: `(model, tokenizer, metadata)`.

    Reads metadata.json and loads the primary artifact: the merged model (bf16, or NF4 with
    bitsandbytes), or the adapter on the 4-bit base rebuilt by the run's plan when the run is
    adapter-only or its merge check flagged the merge. Python code shipped with the model runs only when
    the caller passes `trust_remote_code` (the user's own flag), never because the directory says so.
    """
    path = Path(path)
    check_finished(path)
    metadata = read_metadata(path)
    if metadata is None:
        raise UserError(f"{path} has no metadata.json: not an output directory of Fine-tuning/01_Train.py")
    check_remote_code(path, metadata, trust_remote_code)
    artifact = metadata.get("artifact") or {}
    if artifact.get("primary", "merged") == "adapter" or artifact.get("kind") == "adapter_only":
        _, bnb_config = quantization_plan_from_metadata(metadata)
        model = load_adapter_model(metadata["base_model"], path / artifact.get("adapter_dir", "adapter"), bnb_config,
                                   device, trust_remote_code)
    else:
        model = load_merged_dir(path, None, device, trust_remote_code)
    return model, load_tokenizer(str(path), trust_remote_code), metadata

# ----- reading what a directory says about itself, as untrusted input ------------------------------------

def read_json_file(file: Path, what: str = "") -> Any:
    """A JSON file's content, or a one-line UserError naming the file (not UTF-8, malformed, unreadable)."""
    try:
        return json.loads(Path(file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text (byte {err.start}){what}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err}){what}") from None
    except OSError as err:
        raise UserError(f"{file} cannot be read: {err.strerror}") from None

def read_metadata(directory: str | Path) -> dict | None:
    """A directory's metadata.json as a dict; None when it has none; a one-line UserError when it is broken."""
    file = Path(directory) / "metadata.json"
    if not file.is_file():
        return None
    metadata = read_json_file(file, ": it was cut short or edited; restore it, or rerun the command that wrote it")
    if not isinstance(metadata, dict):
        raise UserError(f"{file} holds a JSON {type(metadata).__name__}, not the object this project writes")
    return metadata

@contextmanager
def metadata_fields(*directories):
    """A field missing from (or of the wrong type in) a directory's metadata.json becomes one line naming the file."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as err:
        files = ", ".join(str(Path(d) / "metadata.json") for d in directories)
        raise UserError(f"{files}: a field is missing or malformed ({type(err).__name__}: {err}); "
                        "it is not as this project writes it") from None

def run_config(metadata: dict) -> dict:
    """The resolved training config a directory records: its own, or (a PTQ sibling) its source's."""
    source = (metadata.get("source") or {}).get("metadata") or {}
    return metadata.get("config") or source.get("config") or {}

def unfinished_run(directory: str | Path) -> bool:
    """A writer's staging directory: `.NAME.partial`, or checkpoints/ without metadata.json."""
    directory = Path(directory).resolve()
    return ((directory.name.startswith(".") and directory.name.endswith(".partial"))
            or (not (directory / "metadata.json").exists() and (directory / "checkpoints").is_dir()))

def check_finished(directory: str | Path) -> None:
    if unfinished_run(directory):
        raise UserError(f"{directory} is an unfinished run: rerun the same training command to finish it, "
                        "or remove it")

def check_remote_code(directory: str | Path, metadata: dict | None, trust_remote_code: bool) -> None:
    """Refuse, in one line, a directory whose model needs its own Python code when the user has not passed
    --trust-remote-code: its metadata says the run trusted remote code, or its config.json maps to shipped
    code (auto_map) for a model type transformers has no class of its own for."""
    if trust_remote_code:
        return
    if metadata and run_config(metadata).get("trust_remote_code"):
        raise UserError(f"{directory} comes from a model that runs Python code shipped with it (its metadata.json "
                        "says trust_remote_code=True); pass --trust-remote-code if you trust its source")
    config_file = Path(directory) / "config.json"
    config = read_json_file(config_file) if config_file.is_file() else {}
    if isinstance(config, dict) and config.get("auto_map"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise UserError(f"{config_file} points to Python code shipped with the model (auto_map) for model_type "
                            f"{config.get('model_type')!r}, which transformers has no class for; pass "
                            "--trust-remote-code if you trust its source")

# ----- writing --------------------------------------------------------------------------------------------

def non_finite_values(value: Any, where: str = "") -> list[str]:
    """`key.path=value` of every nan / inf float inside a JSON-like value."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where or 'the value'}={value}"]
    if isinstance(value, dict):
        return [hit for key, item in value.items()
                for hit in non_finite_values(item, f"{where}.{key}" if where else str(key))]
    if isinstance(value, (list, tuple)):
        return [hit for i, item in enumerate(value) for hit in non_finite_values(item, f"{where}[{i}]")]
    return []

def non_finite_as_null(value: Any) -> Any:
    """A JSON-like value with every nan / inf float replaced by None (for a record that lists them apart)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: non_finite_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [non_finite_as_null(item) for item in value]
    return value

def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity, which other readers reject), atomically and durably: a
    temporary file beside it, fsynced, renamed over `path`, the directory fsynced. A reader sees the old
    file or the whole new one, never a part. A nan or inf is refused naming where it is."""
    path = Path(path)
    bad = non_finite_values(obj)
    if bad:
        raise ValueError(f"refusing to write {path}: not a finite number: {', '.join(bad[:3])} (JSON has no nan or inf)")
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def publish_run(run, cfg: dict, metadata: dict) -> Path:
    """Finish a training run's staging directory (checkpoints dropped, config and metadata written, all
    flushed and marked complete) and publish it under its final name."""
    shutil.rmtree(run.staging / "checkpoints", ignore_errors=True)
    write_json(run.staging / "resolved_config.json", cfg)
    write_json(run.staging / "metadata.json", metadata)
    run.mark_staged()
    return run.publish()
