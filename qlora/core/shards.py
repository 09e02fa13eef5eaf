"""Writing a checkpoint as safetensors shards one tensor at a time, as the Hugging Face hub lays them out
(`model.safetensors`, or `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`).

`safetensors.torch.save_file` takes a whole state dict: every tensor of a shard in memory at once. Here the
layout (names, dtypes, shapes) is known first, so each shard's header is written up front and each tensor
is made, written and dropped in turn: memory holds one tensor, never the model.
The format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets, plus
`__metadata__`), padded with spaces to 8 bytes, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable


SHARD_BYTES = 5 * 10**9  # the shard size of the hub's large checkpoints; a model below it is one model.safetensors
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# torch dtype name -> (safetensors dtype code, bytes per element)
DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4), "int64": ("I64", 8),
          "int32": ("I32", 4), "uint8": ("U8", 1), "int8": ("I8", 1), "bool": ("BOOL", 1)}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: its name, torch dtype name ("bfloat16"), shape, and how to make it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], Any]  # -> a CPU or GPU tensor of this dtype and shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def split_into_shards(specs: list[TensorSpec], shard_bytes: int = SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `shard_bytes` (a larger tensor gets a shard of its own), in order."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPES[spec.dtype][0], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def _tensor_bytes(spec: TensorSpec, tensor) -> memoryview:
    import torch

    if str(tensor.dtype).removeprefix("torch.") != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{spec.name}: made {tensor.dtype} {tuple(tensor.shape)}, the layout says "
                         f"{spec.dtype} {spec.shape}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_shard(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None,
                on_tensor: Callable[[TensorSpec], None] | None = None) -> None:
    """One safetensors file with `specs` in order, each tensor made when its turn comes and dropped after."""
    header = _header(specs, {"format": "pt", **(metadata or {})})
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for spec in specs:
            tensor = spec.make()
            out.write(_tensor_bytes(spec, tensor))
            del tensor
            if on_tensor is not None:
                on_tensor(spec)
        out.flush()
        os.fsync(out.fileno())


def write_checkpoint(directory: Path, specs: Iterable[TensorSpec], shard_bytes: int = SHARD_BYTES,
                     on_tensor: Callable[[TensorSpec], None] | None = None) -> list[str]:
    """`specs` as the hub lays out a checkpoint in `directory`: one model.safetensors, or shards and their index
    ({"metadata": {"total_size", "total_parameters"}, "weight_map"}). Returns the files written."""
    specs = list(specs)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("a checkpoint names each tensor once")
    shards = split_into_shards(specs, shard_bytes)
    if len(shards) == 1:
        write_shard(directory / SINGLE_FILE, shards[0], on_tensor=on_tensor)
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        write_shard(directory / file, shard, on_tensor=on_tensor)
    index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs),
                          "total_parameters": sum(math.prod(spec.shape) for spec in specs)},
             "weight_map": {spec.name: file for file, shard in zip(files, shards) for spec in shard}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [INDEX_FILE]
