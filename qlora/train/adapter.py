"""The trained adapter: saved with what a client needs to load it on its base, and the trained model taken
back from the trainer for the merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from qlora.core.files import absolute_if_local, write_json
from qlora.core.heap import release_free_heap
from qlora.model.loading import load_adapter_model, save_tokenizer


def save_adapter(trainer, directory: Path, fsdp: bool, is_main: bool, base_model: str | None = None,
                 bnb_config=None, tokenizer=None) -> None:
    """The trained adapter into `directory`. Under FSDP every rank takes part in gathering the sharded
    adapter and rank 0 writes it; elsewhere rank 0 saves its own copy. With `base_model`, rank 0 then
    makes the directory self-describing (`describe_adapter`). Full fine-tuning has no adapter: nothing is written
    (write_model saves the model itself)."""
    if getattr(trainer.model, "peft_config", None) is None:
        return
    if fsdp:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(directory))
    elif is_main:
        trainer.model.save_pretrained(directory)
    if is_main and base_model is not None and (Path(directory) / "adapter_config.json").is_file():
        describe_adapter(directory, base_model, bnb_config, tokenizer)


# Beside adapter_config.json: the BitsAndBytesConfig of the base the adapter was trained on (peft reads no
# quantization from adapter_config.json, and an unknown key there makes peft warn about its version).
BASE_QUANTIZATION_FILE = "base_quantization_config.json"


def describe_adapter(directory: Path, base_model: str, bnb_config=None, tokenizer=None) -> None:
    """What a client needs to load the adapter on the base it was trained on: adapter_config.json names
    `base_model` (a hub id as given; a local directory by its absolute path, so that the adapter loads from any
    working directory on this machine), the 4-bit
    plan of the base is written to BASE_QUANTIZATION_FILE (`BitsAndBytesConfig.from_dict` reads it), and the
    tokenizer is saved beside it (AutoPeftModelForCausalLM loads it from there)."""
    import json

    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = absolute_if_local(str(base_model))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")  # as peft writes it
    if bnb_config is not None:
        write_json(Path(directory) / BASE_QUANTIZATION_FILE, bnb_config.to_dict())
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)


def take_trained_model(trainer, cfg: Mapping[str, Any], bnb_config, device: str, adapter_dir: Path, fsdp: bool):
    """The trained model, on its own: the trainer's optimizer state and buffers are freed (and the heap given
    back) before the merge grows memory. FSDP cannot merge in place: the model is rebuilt from the saved adapter."""
    import gc

    model = trainer.model.eval()
    trainer.accelerator.free_memory()  # its references to the optimizer, the scheduler and the wrapped model
    trainer.optimizer = trainer.lr_scheduler = trainer.model = trainer.model_wrapped = None
    forget_optimizer_overrides(model)
    gc.collect()
    release_free_heap()  # what training freed (activations, loss tiles) leaves the process
    if not fsdp:
        return model

    del model
    return load_adapter_model(cfg["MODEL_NAME"], adapter_dir, bnb_config, device, cfg["trust_remote_code"])


def forget_optimizer_overrides(model) -> None:
    """Drop `model`'s modules from bitsandbytes' optimizer-override registry. The Trainer registers the embeddings
    there for 32-bit state when the optimizer is a bitsandbytes one, and the registry, a process-wide singleton,
    keeps them (and so the whole embedding: 0.31 GiB on Gemma 3 270M) alive after training, under the merge and its
    check."""
    from bitsandbytes.optim import GlobalOptimManager

    manager = GlobalOptimManager.get_instance()
    ours = {id(module) for module in model.modules()}
    manager.module_weight_config_triple = [entry for entry in manager.module_weight_config_triple
                                           if id(entry[0]) not in ours]
