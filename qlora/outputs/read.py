"""Reading an output directory back, as untrusted input: its metadata.json, the quantization plan its base
was loaded with, whether it is finished and whether it needs remote code, and its primary artifact loaded."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from qlora.core.errors import UserError
from qlora.core.files import read_json_file
from qlora.model.loading import load_adapter_model, load_merged_dir, load_tokenizer
from quantization_utils import build_quantization_plan


# metadata["quantization"]["extras"] key -> build_quantization_plan option: how the 4-bit base was loaded
BASE_LOAD_EXTRAS = {"double_quant": "double_quant", "base_quant_type": "quant_type",
                    "compute_dtype": "compute_dtype", "quant_storage": "quant_storage"}

def base_load_extras(metadata: dict) -> dict:
    """The extras of a run's quantization block that say how its 4-bit base was loaded."""
    extras = (metadata.get("quantization") or {}).get("extras") or {}
    return {key: value for key, value in extras.items() if key in BASE_LOAD_EXTRAS}

def quantization_plan_from_metadata(metadata: dict):
    """The `(spec, BitsAndBytesConfig | None)` a run used, rebuilt from its metadata's quantization block."""

    block = metadata["quantization"]
    extras = dict(block.get("extras") or {})
    options = {"lora_r": extras.get("lora_r"), "merge_after_train": extras.get("merge_after_train", True)}
    options.update({BASE_LOAD_EXTRAS[key]: value for key, value in base_load_extras(metadata).items()})
    return build_quantization_plan(block["method"], lm_head_dtype=block["lm_head_dtype"], **options)

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
        model = load_adapter_model(metadata["base_model"], adapter_path(path, metadata), bnb_config,
                                   device, trust_remote_code)
    else:
        model = load_merged_dir(path, None, device, trust_remote_code)
    return model, load_tokenizer(str(path), trust_remote_code), metadata

# ----- reading what a directory says about itself, as untrusted input ------------------------------------

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

def adapter_path(directory: str | Path, metadata: dict) -> Path:
    """Where a run directory keeps its adapter: metadata.json's `artifact.adapter_dir`, `adapter` by default."""
    return Path(directory) / ((metadata.get("artifact") or {}).get("adapter_dir") or "adapter")

def check_adapter_run(directory: Path) -> dict:
    """The run's metadata, once `directory` is a finished training output with an adapter."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; give a finished output directory of Fine-tuning/01_Train.py")
    check_finished(directory)
    metadata = read_metadata(directory)
    if metadata is None:
        raise UserError(f"{directory} has no metadata.json: not an output directory of Fine-tuning/01_Train.py")
    adapter = (metadata.get("artifact") or {}).get("adapter_dir")
    if not adapter or not (directory / adapter / "adapter_config.json").is_file():
        raise UserError(f"{directory} has no adapter (a full fine-tune, or adapter/ removed); give a run that kept "
                        "one")
    return metadata

# ----- writing --------------------------------------------------------------------------------------------
