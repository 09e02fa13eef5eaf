"""Output directories as artifacts: reading a finished run back (merged model, adapter on its 4-bit base),
rebuilding the quantization plan it used, and the facts recorded about it (library versions)."""

from __future__ import annotations

from pathlib import Path

from model_loading import load_causal_lm, load_tokenizer

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

# metadata["quantization"]["extras"] key -> build_quantization_plan option: how the 4-bit base was loaded
BASE_LOAD_EXTRAS = {"double_quant": "double_quant", "base_quant_type": "quant_type",
                    "compute_dtype": "compute_dtype", "quant_storage": "quant_storage"}

def base_load_extras(metadata: dict) -> dict:
    """The extras of a run's quantization block that say how its 4-bit base was loaded."""
    extras = (metadata.get("quantization") or {}).get("extras") or {}
    return {key: value for key, value in extras.items() if key in BASE_LOAD_EXTRAS}

def plan_from_metadata(metadata: dict):
    """The `(spec, BitsAndBytesConfig | None)` a run used, rebuilt from its metadata's quantization block."""
    from quantization_utils import build_quantization_plan

    block = metadata["quantization"]
    extras = dict(block.get("extras") or {})
    options = {"lora_r": extras.get("lora_r"), "merge_after_train": extras.get("merge_after_train", True)}
    options.update({BASE_LOAD_EXTRAS[key]: value for key, value in base_load_extras(metadata).items()})
    return build_quantization_plan(block["method"], lm_head_dtype=block["lm_head_dtype"], **options)

def saved_lm_head(directory: str | Path):
    """lm_head.weight as saved in a model directory's safetensors (its own dtype), or None when tied."""
    from merge_utils import checkpoint_reader

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

    from merge_utils import set_lm_head_dtype

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
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()

def load_output_dir(path: str | Path, device: str | None = None):
    """Load any output directory of 01_Train.py: `(model, tokenizer, metadata)`.

    Reads metadata.json and loads the primary artifact: the merged model (bf16, or NF4 with
    bitsandbytes), or the adapter on the 4-bit base rebuilt by the run's plan when the run is
    adapter-only or its merge check flagged the merge.
    """
    import json

    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} has no metadata.json: not an output directory of Fine-tuning/01_Train.py")
    metadata = json.loads(meta_file.read_text())
    artifact = metadata.get("artifact") or {}
    trust = bool((metadata.get("config") or {}).get("trust_remote_code", False))
    if artifact.get("primary", "merged") == "adapter" or artifact.get("kind") == "adapter_only":
        _, bnb_config = plan_from_metadata(metadata)
        model = load_adapter_model(metadata["base_model"], path / artifact.get("adapter_dir", "adapter"), bnb_config,
                                   device, trust)
    else:
        model = load_merged_dir(path, None, device, trust)
    return model, load_tokenizer(str(path), trust), metadata
