"""Merging LoRA / DoRA adapters into a plain 16-bit model, layer by layer.

peft's `merge_and_unload` on a 4-bit base re-quantizes the merged weight to NF4, which changes the
model's outputs. Here each layer's W + scale * B @ A (DoRA: that, rescaled row by row to its learned
magnitude) is computed in fp32 and either written straight into the output's safetensors and freed
(`write_merged`: memory holds the trained model and one layer) or, for families whose weights transformers
renames on load, put in place of the base layer as a plain bf16 `nn.Linear` (`merge_lora`). W is either
  - "dequantized": dequant(NF4(W)), the function the adapter was trained against (exact up to bf16
    rounding), or
  - "original": the 16-bit weight read from the base checkpoint's safetensors, tensor by tensor (not for a
    LoftQ adapter: it starts at W - dequant(NF4(W)), so on W it would add the quantization error twice).
qlora.outputs.write.merge_and_check runs the candidates, saves each and measures it as a user reloads it against the
trained model on held-out examples (max |logit diff|, mean KL(trained || merged), loss), keeps the
closest, optionally re-quantizes it to NF4, and returns the figures for metadata.json.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from qlora.core.heap import freed_blocks_leave_the_heap, release_free_heap
from qlora.core.shards import SHARD_BYTES, TensorSpec, write_checkpoint
from qlora.model.base_weights import MERGE_BASE_WEIGHTS
from qlora.model.checkpoint import checkpoint_reader


class MergeBase(StrEnum):
    """merge_base: which base weight the adapter is folded into."""

    DEQUANTIZED = "dequantized"  # dequant(NF4(W)): what the adapter was trained against
    ORIGINAL = "original"  # the checkpoint's 16-bit W
    AUTO = "auto"  # both merged and checked; the closer one kept


def _plain_linear(layer, weight, dtype):
    import torch

    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.data.to(dtype))
    return linear

def strip_quantization(model) -> None:
    """Remove what marks a transformers model as bitsandbytes-quantized, once no 4-bit layer remains."""
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)

def cast_weights(model, dtype) -> None:
    """Cast parameters and persistent buffers to `dtype`; non-persistent buffers keep their dtype.

    Non-persistent buffers (rotary `inv_freq`, Gemma's `embed_scale`) are not saved: every load
    recomputes them, in fp32. `model.to(bf16)` rounds them too, and the model then differs from the one
    a user reloads (bf16 `inv_freq` moved the demo model's logits by up to 0.21).
    """
    kept = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
            if buffer is not None and name in module._non_persistent_buffers_set]
    model.to(dtype)
    for module, name, buffer in kept:
        module._buffers[name] = buffer

def release_wrapped_model(peft_model) -> None:
    """Drop every reference a PeftModel holds to the transformers model it wraps: the submodule, and the
    bound `prepare_inputs_for_generation` methods that peft keeps for causal LMs (one alone kept a merged
    Qwen3-0.6B, 1.2 GB, alive while the caller held the PeftModel)."""
    wrapped = peft_model.base_model.model
    peft_model.base_model.model = None
    if hasattr(peft_model, "base_model_prepare_inputs_for_generation"):
        peft_model.base_model_prepare_inputs_for_generation = None
    # after a generate(), peft leaves the wrapped model's own prepare_inputs_for_generation (a bound method)
    # on the tuner as an instance attribute: it too kept the model (Gemma 3 270M's 0.31 GiB embedding) alive
    tuner = vars(peft_model.base_model)
    for name in [name for name, value in tuner.items() if getattr(value, "__self__", None) is wrapped]:
        del tuner[name]


def free_wrapped_model(peft_model) -> None:
    """`release_wrapped_model`, then the wrapped model collected and its blocks given back to the OS, before a
    phase reloads a model: it holds itself in reference cycles (its forward, bound and stored on it), so dropping
    the references alone leaves it in memory until Python's next full collection."""
    import gc

    release_wrapped_model(peft_model)
    gc.collect()
    release_free_heap()


def merged_weight(module, adapter: str, weight):
    """`weight` (fp32, the base layer's W) with one adapter folded in, in place, as the adapter's forward
    computes it: W + scale * B @ A for LoRA; for DoRA m * (W + scale * B @ A) / ||W + scale * B @ A||, the
    norm taken over each output row (dim 1 of the (out, in) weight) and m the learned magnitude, as peft's
    DoraLinearLayer does in its forward (where the norm is a constant of the base weight and the adapter)."""
    import torch

    weight += module.get_delta_weight(adapter).to(torch.float32)
    if adapter in getattr(module, "lora_magnitude_vector", {}):
        magnitude = module.lora_magnitude_vector[adapter].weight.to(torch.float32)
        weight *= (magnitude / torch.linalg.norm(weight, dim=1)).view(-1, 1)
    return weight

def merge_lora(peft_model, base: str = "dequantized", model_name: str | None = None, dtype=None):
    """Fold every LoRA or DoRA adapter into its base layer (`merged_weight`), in fp32, cast to `dtype`.

    W is dequant(NF4(W)) for base="dequantized", the checkpoint's 16-bit weight of `model_name` for
    base="original". Returns the unwrapped transformers model with only plain Linear layers, its weights
    in `dtype` (bf16 by default; non-persistent buffers as loaded), quantization markers removed.
    `peft_model` is consumed: it no longer holds the model, so references to it left elsewhere do not
    keep the merged model alive once its own references are gone.
    """
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    if base not in MERGE_BASE_WEIGHTS:
        raise ValueError(f"merge base {base!r} is unknown; allowed: {', '.join(MERGE_BASE_WEIGHTS)}")
    dtype = dtype or torch.bfloat16
    read = checkpoint_reader(model_name) if base == "original" else None
    base_weight = MERGE_BASE_WEIGHTS[base]
    model = peft_model.base_model.model
    release_wrapped_model(peft_model)
    # Every layer's fp32 working copies are freed at once; without this the heap kept them resident
    # (Qwen3-0.6B on CPU: RSS grew ~0.8 GiB beyond the merged weights during the merge).
    with freed_blocks_leave_the_heap():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                weight = _merged_layer_weight(module, name, base_weight, read, torch.float32)
                model.set_submodule(name, _plain_linear(module.get_base_layer(), weight, dtype))
                del weight
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):  # layers without an adapter (lora targets a subset)
                model.set_submodule(name, _plain_linear(module, base_weight(module, name, read), dtype))
    strip_quantization(model)
    cast_weights(model, dtype)  # undo prepare_model_for_kbit_training's fp32 upcast of norms and embeddings
    model.config.dtype = dtype
    return model


def _short(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _merged_layer_weight(module, name: str, base_weight, read, dtype):
    """The LoRA/DoRA layer `module`'s merged weight in `dtype` (its fp32 working copy freed on return)."""
    weight = base_weight(module.get_base_layer(), name, read)
    for adapter in module.active_adapters:
        weight = merged_weight(module, adapter, weight)
    return weight.to(dtype)


def merged_layout(model, base_weight, read, dtype, head_dtype=None) -> list[TensorSpec]:
    """The merged checkpoint of `model` (a transformers model with peft LoRA layers and bitsandbytes 4-bit
    layers in it) as TensorSpecs in state-dict order, each made only when written: a LoRA layer's weight is
    W + delta (`merged_weight`), a 4-bit layer's weight dequantized, every other floating tensor cast to
    `dtype`; persistent tensors only, a tied weight once (under its first name, as save_pretrained keeps it).
    `head_dtype` (fp16) gives lm_head its own tensor in that dtype, untied."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    specs, seen, wrapped = [], set(), []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue  # inside a LoRA or 4-bit layer: its merged weight stands for it
        prefix = f"{name}." if name else ""
        if isinstance(module, (LoraLayer, bnb.nn.Linear4bit)):
            wrapped.append(name)
            layer = module.get_base_layer() if isinstance(module, LoraLayer) else module
            make = ((lambda m=module, n=name: _merged_layer_weight(m, n, base_weight, read, dtype))
                    if isinstance(module, LoraLayer) else
                    (lambda m=module, n=name: base_weight(m, n, read).to(dtype)))
            specs.append(TensorSpec(prefix + "weight", _short(dtype), (layer.out_features, layer.in_features), make))
            tensors = {"bias": layer.bias} if layer.bias is not None else {}
        else:
            tensors = {**{key: p for key, p in module._parameters.items() if p is not None},
                       **{key: b for key, b in module._buffers.items()
                          if b is not None and key not in module._non_persistent_buffers_set}}
        for key, tensor in tensors.items():
            tied_head = module is head and key == "weight" and head_dtype is not None
            if id(tensor) in seen and not tied_head:
                continue
            seen.add(id(tensor))
            target = head_dtype if tied_head else (dtype if tensor.is_floating_point() else tensor.dtype)
            specs.append(TensorSpec(prefix + key, _short(target), tuple(tensor.shape),
                                    lambda t=tensor, d=target: t.detach().to(d)))
    if head_dtype is not None and not any(spec.name == f"{head_name}.weight" for spec in specs):
        raise RuntimeError(f"{head_name}.weight is missing from the merged layout")
    return specs


def merged_config(model, dtype, head_dtype=None):
    """The merged model's config: the trained model's, without quantization, in `dtype`; lm_head untied when it is
    stored in its own dtype."""
    import copy

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    if head_dtype is not None:
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    return config


def streams_merge(model) -> bool:
    """Whether the model's weights are saved under the names it holds them by: transformers renames or fuses
    some families' weights on load (MoE experts, multimodal prefixes) and reverts that on save, which only its
    own save_pretrained knows; those merge in memory."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return get_checkpoint_conversion_mapping(model.config.model_type) is None


def write_merged(peft_model, directory: Path, base: str = "dequantized", model_name: str | None = None,
                 dtype=None, head_dtype=None, shard_bytes: int = SHARD_BYTES, progress: bool = False) -> list[str]:
    """Merge `peft_model` (LoRA/DoRA on a 4-bit or 16-bit base) into a 16-bit checkpoint in `directory`, one
    tensor at a time: each layer's W + delta is made, written to its safetensors shard and freed, so memory
    holds the trained model plus one layer, never the merged model. Writes config.json,
    generation_config.json and the shards (+ index). The same tensors as `merge_lora` + save_pretrained.
    `peft_model` is left as it was. Returns the weight files written."""
    import torch
    from tqdm.auto import tqdm

    if base not in MERGE_BASE_WEIGHTS:
        raise ValueError(f"merge base {base!r} is unknown; allowed: {', '.join(MERGE_BASE_WEIGHTS)}")
    dtype = dtype or torch.bfloat16
    model = peft_model.base_model.model
    read = checkpoint_reader(model_name) if base == "original" else None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head_dtype = None if head_dtype in (None, dtype) else head_dtype
    specs = merged_layout(model, MERGE_BASE_WEIGHTS[base], read, dtype, head_dtype)
    with (torch.no_grad(), freed_blocks_leave_the_heap(),  # each layer's fp32 working copy leaves at once
          tqdm(total=len(specs), desc=f"merging ({base})", unit="tensor", leave=False, disable=not progress) as bar):
        files = write_checkpoint(directory, specs, shard_bytes, on_tensor=lambda _: bar.update())
    merged_config(model, dtype, head_dtype).save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    return files
