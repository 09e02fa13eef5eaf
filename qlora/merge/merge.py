"""Merging LoRA adapters into a plain 16-bit model, and checking the merge before it is written.

peft's `merge_and_unload` on a 4-bit base re-quantizes the merged weight to NF4, which changes the
model's outputs. Here each base layer is replaced, one at a time, by a plain bf16 `nn.Linear` holding
W + scale * B @ A (DoRA: that, rescaled row by row to its learned magnitude) computed in fp32, so the
merge never holds two copies of the model. W is either
  - "dequantized": dequant(NF4(W)), the function the adapter was trained against (exact up to bf16
    rounding), or
  - "original": the 16-bit weight read from the base checkpoint's safetensors, tensor by tensor (not for a
    LoftQ adapter: it starts at W - dequant(NF4(W)), so on W it would add the quantization error twice).
`merge_and_check` runs the candidates, saves each and measures it as a user reloads it against the
trained model on held-out examples (max |logit diff|, mean KL(trained || merged), loss), keeps the
closest, optionally re-quantizes it to NF4, and returns the figures for metadata.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

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

def _release_model(peft_model) -> None:
    """Drop every reference a PeftModel holds to the transformers model it wraps: the submodule, and the
    bound `prepare_inputs_for_generation` that peft keeps for causal LMs (it alone kept a merged
    Qwen3-0.6B, 1.2 GB, alive while the caller held the PeftModel)."""
    peft_model.base_model.model = None
    if hasattr(peft_model, "base_model_prepare_inputs_for_generation"):
        peft_model.base_model_prepare_inputs_for_generation = None


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

    from qlora.core.heap import freed_blocks_leave_the_heap

    if base not in MERGE_BASE_WEIGHTS:
        raise ValueError(f"merge base {base!r} is unknown; allowed: {', '.join(MERGE_BASE_WEIGHTS)}")
    dtype = dtype or torch.bfloat16
    read = checkpoint_reader(model_name) if base == "original" else None
    base_weight = MERGE_BASE_WEIGHTS[base]
    model = peft_model.base_model.model
    _release_model(peft_model)
    # Every layer's fp32 working copies are freed at once; without this the heap kept them resident
    # (Qwen3-0.6B on CPU: RSS grew ~0.8 GiB beyond the merged weights during the merge).
    with freed_blocks_leave_the_heap():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                weight = base_weight(layer, name, read)
                for adapter in module.active_adapters:
                    weight = merged_weight(module, adapter, weight)
                model.set_submodule(name, _plain_linear(layer, weight, dtype))
                del weight
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):  # layers without an adapter (lora targets a subset)
                model.set_submodule(name, _plain_linear(module, base_weight(module, name, read), dtype))
    strip_quantization(model)
    cast_weights(model, dtype)  # undo prepare_model_for_kbit_training's fp32 upcast of norms and embeddings
    model.config.dtype = dtype
    return model

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

def _cast_input_to_head_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])

def set_lm_head_dtype(model, dtype, weight=None) -> None:
    """Give lm_head its own weight in `dtype` (untied from the embedding when they were tied).

    `weight` (optional) is the head's saved tensor, used as is: a head loaded through a model-wide
    dtype cast would lose the bits the fp16 head keeps. When the head's dtype differs from the model's,
    its input is cast to it, so the model runs and the logits come out in `dtype`.
    """
    import torch

    head = model.get_output_embeddings()
    source = head.weight if weight is None else weight
    head.weight = torch.nn.Parameter(source.detach().to(device=head.weight.device, dtype=dtype).clone(),
                                     requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    if dtype != model.get_input_embeddings().weight.dtype and not getattr(head, "_casts_input", False):
        head.register_forward_pre_hook(_cast_input_to_head_dtype)
        head._casts_input = True

def head_dtype_name(model) -> str:
    """Short name of the dtype lm_head really has: 'bf16' | 'fp16' | 'fp32'."""
    from quantization_utils import short_dtype_name

    return short_dtype_name(str(model.get_output_embeddings().weight.dtype))

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

def _comparison_sums(ref, cand, batch) -> dict[str, float]:
    """One batch's share of `compare_logits`: sums and maxima over its non-padding tokens."""
    import torch

    mask = batch["attention_mask"].bool()
    ref, cand = ref[mask], cand[mask]
    diff = ref - cand
    ref_logp, cand_logp = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    return {"max_abs": diff.abs().max().item(), "max_logit": ref.abs().max().item(),
            "diff_sq": diff.pow(2).sum().item(), "ref_sq": ref.pow(2).sum().item(),
            "kl_sum": (ref_logp.exp() * (ref_logp - cand_logp)).sum().item(), "tokens": int(mask.sum())}

def _comparison(parts: list[dict[str, float]]) -> dict[str, Any]:
    tokens = sum(p["tokens"] for p in parts)
    return {"max_abs_logit_diff": max(p["max_abs"] for p in parts), "max_abs_logit": max(p["max_logit"] for p in parts),
            "relative_error": (sum(p["diff_sq"] for p in parts) / max(sum(p["ref_sq"] for p in parts), 1e-30)) ** 0.5,
            "mean_kl": sum(p["kl_sum"] for p in parts) / max(tokens, 1), "tokens": tokens}

def compare_logits(reference: list, candidate: list, batches) -> dict[str, Any]:
    """Max |logit difference|, relative error ||candidate - reference|| / ||reference|| and mean per-token
    KL(reference || candidate) over non-padding tokens; `max_abs_logit` (the reference's largest |logit|)
    sets the scale of bf16 rounding (2**-8 relative)."""
    return _comparison([_comparison_sums(r, c, b) for r, c, b in zip(reference, candidate, batches)])

def _loss_sum(out, batch) -> tuple[float, int]:
    """Summed next-token cross-entropy of one batch over its non-padding tokens, and their count."""
    import torch

    labels = batch["input_ids"][:, 1:].clone()
    labels[~batch["attention_mask"][:, 1:].bool()] = -100
    total = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum",
                                              ignore_index=-100).item()
    return total, int((labels != -100).sum())

def sequence_loss(logits: list, batches) -> float:
    """Mean next-token cross-entropy over the non-padding tokens of `batches`."""
    sums = [_loss_sum(out, batch) for out, batch in zip(logits, batches)]
    return sum(t for t, _ in sums) / max(sum(c for _, c in sums), 1)

FINGERPRINT_TOKENS, FINGERPRINT_VOCAB = 16, 8

def logits_fingerprint(model, input_ids: list[int]) -> dict[str, Any]:
    """A small record of `model`'s logits on `input_ids`: the first few vocabulary entries per position,
    the argmax per position and the sum of |logits|; saved at save time, compared after reloading."""
    import torch

    logits = logits_on(model, [{"input_ids": torch.tensor([input_ids]),
                                "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long)}])[0][0]
    return {"input_ids": list(input_ids), "logits_head": logits[:, :FINGERPRINT_VOCAB].tolist(),
            "argmax": logits.argmax(-1).tolist(), "abs_sum": logits.abs().sum().item()}

def fingerprint_difference(recorded: dict[str, Any], actual: dict[str, Any]) -> float:
    """Max |difference| between two fingerprints' logits (inf when they were taken on other inputs)."""
    import torch

    if recorded["input_ids"] != actual["input_ids"]:
        return float("inf")
    return (torch.tensor(recorded["logits_head"]) - torch.tensor(actual["logits_head"])).abs().max().item()

def measure_candidate(model, trained_logits: list, batches) -> dict[str, Any]:
    """Merge-check figures of one candidate against the trained model's logits, one batch at a time (only
    the trained model's logits are kept: at a 152k vocabulary each token's fp32 logits take 0.6 MB)."""
    parts, losses = [], []
    for ref, batch in zip(trained_logits, batches):
        (cand,) = logits_on(model, [batch])
        parts.append(_comparison_sums(ref, cand, batch))
        losses.append(_loss_sum(cand, batch))
        del cand
    return {**_comparison(parts), "loss": sum(t for t, _ in losses) / max(sum(c for _, c in losses), 1)}

def _move_contents(source: Path, target: Path) -> None:
    import os
    import shutil

    for item in source.iterdir():
        os.replace(item, target / item.name)
    shutil.rmtree(source)

def measure_saved(directory: Path, reload: Callable[[Path], Any], trained_logits: list, batches,
                  fingerprint_ids: list[int]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A saved model directory, reloaded by `reload` as a user loads it, measured against the trained model:
    (merge-check figures, logits fingerprint, lm_head dtype name). The reloaded model is freed before
    returning."""
    import gc

    from qlora.core.heap import release_free_heap

    release_free_heap()  # the model that wrote `directory` was just freed: its memory leaves before the reload
    model = reload(directory)
    figures = measure_candidate(model, trained_logits, batches)
    fingerprint = logits_fingerprint(model, fingerprint_ids)
    head = head_dtype_name(model)
    del model
    gc.collect()
    release_free_heap()
    return figures, fingerprint, head

def merge_and_check(model, *, staging: Path, model_name: str, batches, merge_base: str, precision: str,
                    head_dtype, max_kl: float, load_trained: Callable[[], Any], load_merged: Callable[..., Any],
                    reload: Callable[[Path], Any],
                    report: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge `model` (a trained PeftModel), check every candidate, write the kept one into `staging`.

    merge_base "dequantized" | "original" | "auto" (both, the one with the lower mean KL kept);
    precision "bf16" (plain safetensors) | "nf4" (the kept candidate re-quantized through
    `load_merged(dir)`, bitsandbytes serialization). Every candidate is saved first (to
    `staging/.merge-*`, the NF4 one to `staging`), freed, and measured as `reload(dir)` loads it back
    (as a user loads it: plain `from_pretrained`, the saved fp16 head kept): the figures and fingerprints are
    those of the files, not of the object that wrote them. Only one copy of the model is in memory at a time
    (`load_trained()` rebuilds the trained model for the second candidate of "auto"). Returns (merge_check,
    artifact) for metadata.json.
    """
    import gc
    import shutil

    import torch

    trained = logits_on(model, batches)
    fingerprint_ids = batches[0]["input_ids"][0, :FINGERPRINT_TOKENS].tolist()
    candidates, fingerprints, head_names = {}, {}, {}
    bases = ("dequantized", "original") if merge_base == "auto" else (merge_base,)
    for i, base in enumerate(bases):
        if i > 0:
            model = load_trained()
        merged = merge_lora(model, base, model_name)
        del model
        if head_dtype != torch.bfloat16:
            set_lm_head_dtype(merged, head_dtype)
        merged.save_pretrained(staging / f".merge-{base}")
        del merged
        gc.collect()
        candidates[base], fingerprints[base], head_names[base] = measure_saved(
            staging / f".merge-{base}", reload, trained, batches, fingerprint_ids)
        report(f"{base}: " + _figures(candidates[base]))
    chosen = min(bases, key=lambda b: candidates[b]["mean_kl"])
    final = chosen
    if precision == "nf4":
        quantized = load_merged(staging / f".merge-{chosen}")
        # Saved before any forward: on CPU, bitsandbytes repacks 4-bit weights on the first inference
        # forward with bf16 absmax, and re-quantizes them on save, so a model saved after a forward is
        # not the one a forward ran on.
        quantized.save_pretrained(staging)
        del quantized
        gc.collect()
        candidates["nf4"], fingerprints["nf4"], head_names["nf4"] = measure_saved(
            staging, reload, trained, batches, fingerprint_ids)
        report(f"nf4 (re-quantized {chosen}): " + _figures(candidates["nf4"]))
        final = "nf4"
    else:
        _move_contents(staging / f".merge-{chosen}", staging)
    for base in bases:
        shutil.rmtree(staging / f".merge-{base}", ignore_errors=True)
    passed = candidates[final]["mean_kl"] <= max_kl
    merge_check = {
        "trained_loss": sequence_loss(trained, batches), "candidates": candidates, "chosen_base": chosen,
        "artifact_candidate": final, "max_kl": max_kl, "passed": passed,
        "primary_artifact": "merged" if passed else "adapter",
        **{k: candidates[final][k] for k in ("max_abs_logit_diff", "mean_kl", "tokens", "loss")},
    }
    artifact = {"kind": f"merged_{precision}", "weights_bits": 4 if precision == "nf4" else 16,
                "merge_base": chosen, "primary": "merged" if passed else "adapter", "lm_head_dtype": head_names[final],
                "fingerprints": {"merged": fingerprints[final]}}
    return merge_check, artifact

def _figures(figures: dict[str, Any]) -> str:
    return (f"max |logit diff| {figures['max_abs_logit_diff']:.4g}, mean KL {figures['mean_kl']:.3g}, "
            f"loss {figures['loss']:.4f} over {figures['tokens']} held-out tokens")

def tokenize_for_check(tokenizer, examples, max_length: int) -> list[dict]:
    """Held-out rows (conversations or text) as single-sequence batches for the merge check, tokenized exactly
    as the trainer tokenized them."""
    import torch

    from qlora.data.chat_format import example_token_ids

    batches = []
    for example in examples:
        ids = torch.tensor([example_token_ids(tokenizer, example)[:max_length]])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches

MERGE_CHECK_ROWS = 8  # held-out rows the merge check compares the merged model with the trained one on

def write_model(model, *, cfg: dict, staging: Path, tokenizer, check_rows, bnb_config, device: str,
                memory_plan: dict, report: Callable[[str], None]) -> tuple[dict | None, dict, dict]:
    """Write the run's model into `staging` beside its adapter: the fully fine-tuned model, or the merged one
    (checked against the trained model first), or nothing more for an adapter-only run. Returns
    (merge_check, artifact, memory_plan) for metadata.json; `model` is consumed."""
    import torch

    from qlora.outputs.artifacts import load_adapter_model, load_merged_dir
    from qlora.core.heap import release_free_heap
    from qlora.planner.memory import with_merge_check
    from qlora.core.memory import GIB
    from quantization_utils import QuantMethod, build_quantization_plan

    fingerprint_ids = tokenize_for_check(tokenizer, check_rows.select(range(1)), FINGERPRINT_TOKENS)[0]["input_ids"][0]
    load_trained = lambda: load_adapter_model(cfg["MODEL_NAME"], staging / "adapter", bnb_config, device,  # noqa: E731
                                              cfg["trust_remote_code"])
    reload = lambda path: load_merged_dir(path, None, device, cfg["trust_remote_code"])  # noqa: E731
    if cfg["PEFT_CONFIG"] == "Full":
        cast_weights(model, torch.bfloat16)
        model.save_pretrained(staging)
        # the weights leave memory before the reload (the trainer's callbacks still hold the model object)
        model.to("meta")
        release_free_heap()
        return None, {"kind": "full_bf16", "weights_bits": 16, "merge_base": None, "primary": "merged",
                      "fingerprints": {"merged": logits_fingerprint(reload(staging), fingerprint_ids.tolist())}}, memory_plan
    if not cfg["merge_after_train"]:  # what the adapter gives when reloaded on the 4-bit base by the same plan
        _release_model(model)  # the trained weights go before the reload: one copy in memory at a time
        return None, {"kind": "adapter_only", "weights_bits": None, "merge_base": None, "primary": "adapter",
                      "fingerprints": {"adapter": logits_fingerprint(load_trained(), fingerprint_ids.tolist())}}, memory_plan
    batches = tokenize_for_check(tokenizer, check_rows.select(range(min(MERGE_CHECK_ROWS, len(check_rows)))),
                                 cfg["max_seq_length"])
    memory_plan = with_merge_check(memory_plan, [int(b["attention_mask"].sum()) for b in batches],
                                   model.config.get_text_config().vocab_size, device.split(":")[0])
    if "merge_check_logits_bytes" in memory_plan:
        report(f"merge check over {memory_plan['merge_check_tokens']} tokens: merge phase predicted "
               f"{memory_plan['merge_peak_bytes'] / GIB:.2f} GiB (its logits "
               f"{memory_plan['merge_check_logits_bytes'] / GIB:.2f}); peak {memory_plan['peak_gib']:.2f} GiB")
    _, nf4_config = build_quantization_plan(QuantMethod.QLORA)
    head_dtype = torch.float16 if cfg["keep_lm_head_fp16"] else torch.bfloat16
    merge_check, artifact = merge_and_check(
        model, staging=staging, model_name=cfg["MODEL_NAME"], batches=batches, merge_base=cfg["merge_base"],
        precision=cfg["merged_precision"], head_dtype=head_dtype, max_kl=cfg["merge_check_max_kl"],
        load_trained=load_trained, load_merged=lambda path: load_merged_dir(path, nf4_config, device,
                                                                            cfg["trust_remote_code"]),
        reload=reload, report=report)
    planned_head = "fp16" if cfg["keep_lm_head_fp16"] else "bf16"
    if artifact["lm_head_dtype"] != planned_head:  # the tag names the head's dtype: it must be true on disk
        raise RuntimeError(f"saved lm_head is {artifact['lm_head_dtype']}, but the plan says {planned_head}")
    if merge_check["passed"]:
        report(f"kept the {merge_check['chosen_base']} merge ({cfg['merged_precision']}): mean KL "
               f"{merge_check['mean_kl']:.3g} <= merge_check_max_kl {cfg['merge_check_max_kl']:.3g}")
    else:
        report(f"!!! MERGE CHECK FAILED: mean KL {merge_check['mean_kl']:.3g} > merge_check_max_kl "
               f"{cfg['merge_check_max_kl']:.3g}; the merged model differs from the trained one. The adapter "
               "(adapter/, on the 4-bit base) is the primary artifact !!!")
        # what the primary artifact gives when reloaded on the 4-bit base by the same plan
        artifact["fingerprints"]["adapter"] = logits_fingerprint(load_trained(), fingerprint_ids.tolist())
    return merge_check, artifact, memory_plan
