"""A base layer's weight as an fp32 tensor, two ways: dequantized from its NF4 form (what the adapter was
trained against), or the original 16-bit tensor read from the checkpoint. The merge and LoftQ use both."""

from __future__ import annotations

import copy
from typing import Callable


def dense_weight(layer, keep_layout: bool = False):
    """The weight of a Linear, nn or bitsandbytes 4-bit, as an fp32 tensor of its logical shape. A 4-bit weight
    repacked for inference is unpacked, and stored back unpacked unless `keep_layout` (a read that leaves the
    layer as it was, so its next forward does not repack it again)."""
    import bitsandbytes as bnb
    import torch

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel on the first CPU inference
            # forward; dequantize_4bit expects the storage layout, so unpack first.
            if keep_layout:  # the inverse conversion changes the state it is given: it gets a copy
                data, state = data.clone(), copy.deepcopy(state)
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            if not keep_layout:
                weight.data, weight.quant_state = data, state
        return bnb.functional.dequantize_4bit(data, state).to(torch.float32)
    return weight.data.to(torch.float32)


def _original_weight(layer, name: str, read):
    import torch

    weight = read(f"{name}.weight").to(device=layer.weight.device, dtype=torch.float32)
    expected = (layer.out_features, layer.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"checkpoint tensor {name}.weight has shape {tuple(weight.shape)}, the model {expected}")
    return weight


MERGE_BASE_WEIGHTS: dict[str, Callable] = {
    "dequantized": lambda layer, name, read: dense_weight(layer),
    "original": _original_weight,
}
