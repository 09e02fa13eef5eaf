"""Reading a model's safetensors checkpoint one tensor at a time (hub id or local directory), without
loading the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def checkpoint_reader(model_name: str) -> Callable[[str], Any]:
    """A function key -> tensor over the safetensors checkpoint of a hub id or local directory.

    Tensors are read one at a time from their shard (lazily, memory-mapped); nothing else is loaded.
    """
    import json

    from safetensors import safe_open

    directory = Path(model_name)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(model_name, allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = {key: directory / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    else:
        single = directory / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{model_name}: no model.safetensors or model.safetensors.index.json")
        with safe_open(str(single), "pt") as f:
            files = {key: single for key in f.keys()}

    def read(key: str):
        if key not in files:
            raise KeyError(f"{model_name}: checkpoint has no tensor {key!r}")
        with safe_open(str(files[key]), "pt") as f:
            return f.get_tensor(key)

    return read
