"""Merging LoRA adapters into a plain 16-bit model, and checking the merge before it is written.

peft's `merge_and_unload` on a 4-bit base re-quantizes the merged weight to NF4, which changes the
model's outputs. Here the base weight is dequantized, the scaled adapter product added in fp32, and
the result kept as a plain bf16 `nn.Linear`: the function the adapter was trained against, exactly
up to bf16 rounding. Layers are replaced one at a time, so the merge never holds two copies.
"""

from __future__ import annotations

from typing import Any


def dense_weight(layer):
    """The weight of a Linear, nn or bitsandbytes 4-bit, as an fp32 tensor of its logical shape."""
    import bitsandbytes as bnb
    import torch

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel on the first CPU inference
            # forward; dequantize_4bit expects the storage layout, so unpack first.
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            weight.data, weight.quant_state = data, state
        return bnb.functional.dequantize_4bit(data, state).to(torch.float32)
    return weight.data.to(torch.float32)


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


def merge_lora_dequantized(peft_model, dtype=None):
    """Fold every LoRA adapter into its base layer: W' = dequant(W) + scale * B @ A, in fp32, cast to `dtype`.

    Returns the unwrapped transformers model with only plain Linear layers, all in `dtype` (bf16 by
    default), quantization markers removed. `peft_model` is consumed.
    """
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    dtype = dtype or torch.bfloat16
    model = peft_model.base_model.model
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = dense_weight(base)
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).to(torch.float32)
            model.set_submodule(name, _plain_linear(base, weight, dtype))
            del weight
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):  # layers without an adapter (lora targets a subset)
            model.set_submodule(name, _plain_linear(module, dense_weight(module), dtype))
    strip_quantization(model)
    model.to(dtype)  # undo prepare_model_for_kbit_training's fp32 upcast of norms and embeddings
    model.config.dtype = dtype
    return model


def untie_lm_head(model, dtype) -> None:
    """Give lm_head its own weight (a copy of the tied embedding) in `dtype`."""
    import torch

    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight or getattr(model.config, "tie_word_embeddings", False):
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    head.to(dtype)


def logits_on(model, batches) -> list:
    """fp32 logits of `model` on each batch (dicts of input_ids / attention_mask), on CPU."""
    import torch

    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs.append(model(**batch).logits.float().cpu())
    return outputs


def compare_logits(reference: list, candidate: list, batches) -> dict[str, Any]:
    """Max |logit difference|, relative error ||candidate - reference|| / ||reference|| and mean per-token
    KL(reference || candidate), over non-padding tokens."""
    import torch

    max_abs, kl_sum, tokens, diff_sq, ref_sq = 0.0, 0.0, 0, 0.0, 0.0
    for ref, cand, batch in zip(reference, candidate, batches):
        mask = batch["attention_mask"].bool()
        ref, cand = ref[mask], cand[mask]
        max_abs = max(max_abs, (ref - cand).abs().max().item())
        diff_sq += (ref - cand).pow(2).sum().item()
        ref_sq += ref.pow(2).sum().item()
        ref_logp, cand_logp = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
        kl_sum += (ref_logp.exp() * (ref_logp - cand_logp)).sum().item()
        tokens += int(mask.sum())
    return {"max_abs_logit_diff": max_abs, "relative_error": (diff_sq / max(ref_sq, 1e-30)) ** 0.5,
            "mean_kl": kl_sum / max(tokens, 1), "tokens": tokens}
