"""Writing a run's model beside its adapter: the merged model, checked against the trained model before it
is kept (merge_and_check), the fully fine-tuned model, or nothing more for an adapter-only run."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Callable

from qlora.checks.logits import (FINGERPRINT_TOKENS, MERGE_CHECK_ROWS, check_logits_bytes, kl_limit,
                                 logits_fingerprint, measure_saved, tokenize_for_check, trained_reference)
from qlora.core.heap import release_free_heap
from qlora.core.logs import step
from qlora.core.memory import headroom_bytes
from qlora.merge.weights import (cast_weights, free_wrapped_model, merge_lora, release_wrapped_model, streams_merge,
                                 write_merged)
from qlora.model.loading import load_adapter_model, load_merged_dir, set_lm_head_dtype
from qlora.train.peft import PeftKind
from quantization_utils import QuantMethod, build_quantization_plan


class MergedPrecision(StrEnum):
    """merged_precision: how the merged model is stored."""

    BF16 = "bf16"  # plain transformers, no bitsandbytes needed
    NF4 = "nf4"  # re-quantized with bitsandbytes: smaller, further from the trained model


def _move_contents(source: Path, target: Path) -> None:
    import os
    import shutil

    for item in source.iterdir():
        os.replace(item, target / item.name)
    shutil.rmtree(source)


def _write_candidate(model, directory: Path, base: str, model_name: str, head_dtype, load_trained):
    """One merge candidate written into `directory`: streamed layer by layer (`write_merged`) where the model's
    weights keep their names on save, else merged in memory and saved by transformers (the trained model is then
    consumed and rebuilt by `load_trained` for a next candidate). Returns the trained model, or None if consumed."""
    import torch

    if model is None:
        model = load_trained()
    if streams_merge(model.base_model.model):
        write_merged(model, directory, base, model_name, head_dtype=head_dtype, progress=True)
        return model
    merged = merge_lora(model, base, model_name)
    if head_dtype != torch.bfloat16:
        set_lm_head_dtype(merged, head_dtype)
    merged.save_pretrained(directory)
    return None


def merge_and_check(model, *, staging: Path, model_name: str, batches, merge_base: str, precision: str,
                    head_dtype, max_kl: float, load_trained: Callable[[], Any], load_merged: Callable[..., Any],
                    reload: Callable[[Path], Any],
                    report: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge `model` (a trained PeftModel), check every candidate, write the kept one into `staging`.

    merge_base "dequantized" | "original" | "auto" (both, the one with the lower mean KL kept);
    precision "bf16" (plain safetensors) | "nf4" (the kept candidate re-quantized through
    `load_merged(dir)`, bitsandbytes serialization). Every candidate is written first (to `staging/.merge-*`,
    streamed: memory holds the trained model and one layer), the trained model is freed, and each candidate is
    measured as `reload(dir)` loads it back (as a user loads it, within the memory training already took:
    offloaded where it is larger): the figures and fingerprints are those of the files, not of the object that
    wrote them. Returns (merge_check, artifact) for metadata.json.
    """
    import gc
    import shutil

    # the trained model's logits, spilled to files, and the rounding floor the verdict allows for
    trained, trained_loss, floor = trained_reference(model, batches, staging / ".merge-check")
    report(f"trained model: loss {trained_loss:.4f} over the check rows; bf16 rounding floor: mean KL {floor:.3g}")
    fingerprint_ids = batches[0]["input_ids"][0, :FINGERPRINT_TOKENS].tolist()
    candidates, fingerprints, head_names = {}, {}, {}
    bases = ("dequantized", "original") if merge_base == "auto" else (merge_base,)
    for base in bases:
        model = _write_candidate(model, staging / f".merge-{base}", base, model_name, head_dtype, load_trained)
    if model is not None:
        release_wrapped_model(model)
    del model
    gc.collect()
    release_free_heap()  # the trained model's freed blocks leave the process before the candidates are reloaded
    for base in bases:
        step("check", "%s merge reloaded from its files, against the trained model's logits", base)
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
    for leftover in [f".merge-{base}" for base in bases] + [".merge-check"]:
        shutil.rmtree(staging / leftover, ignore_errors=True)
    limit = kl_limit(floor, max_kl)
    passed = candidates[final]["mean_kl"] <= limit
    merge_check = {
        "trained_loss": trained_loss, "candidates": candidates, "chosen_base": chosen,
        "artifact_candidate": final, "max_kl": max_kl, "rounding_floor_kl": floor, "kl_limit": limit, "passed": passed,
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


def _limit_words(check: dict[str, Any]) -> str:
    if check["kl_limit"] > check["max_kl"]:
        return f"the bf16 rounding floor {check['kl_limit']:.3g} (above merge_check_max_kl)"
    return f"merge_check_max_kl {check['max_kl']:.3g}"


def write_model(model, *, cfg: dict, staging: Path, tokenizer, check_rows, bnb_config, device: str,
                report: Callable[[str], None] = lambda line: step("merge", "%s", line)) -> tuple[dict | None, dict]:
    """Write the run's model into `staging` beside its adapter: the fully fine-tuned model, or the merged one
    (checked against the trained model first), or nothing more for an adapter-only run. Returns
    (merge_check, artifact) for metadata.json; `model` is consumed."""
    import torch

    fingerprint_ids = tokenize_for_check(tokenizer, check_rows.select(range(1)), FINGERPRINT_TOKENS)[0]["input_ids"][0]
    load_trained = lambda: load_adapter_model(cfg["MODEL_NAME"], staging / "adapter", bnb_config, device,  # noqa: E731
                                              cfg["trust_remote_code"])
    reload = lambda path: load_merged_dir(path, None, device, cfg["trust_remote_code"])  # noqa: E731
    if cfg["PEFT_CONFIG"] == PeftKind.FULL:
        cast_weights(model, torch.bfloat16)
        model.save_pretrained(staging)
        # the weights leave memory before the reload (the trainer's callbacks still hold the model object)
        model.to("meta")
        release_free_heap()
        return None, {"kind": "full_bf16", "weights_bits": 16, "merge_base": None, "primary": "merged",
                      "fingerprints": {"merged": logits_fingerprint(reload(staging), fingerprint_ids.tolist())}}
    if not cfg["merge_after_train"]:  # what the adapter gives when reloaded on the 4-bit base by the same plan
        # (the trained model in memory differs from the reloaded one by a bf16 step in places: the reload it is)
        free_wrapped_model(model)  # the trained weights go before the reload: one copy in memory at a time
        step("check", "the adapter reloaded on its base, for its fingerprint")
        return None, {"kind": "adapter_only", "weights_bits": None, "merge_base": None, "primary": "adapter",
                      "fingerprints": {"adapter": logits_fingerprint(load_trained(), fingerprint_ids.tolist())}}
    batches = tokenize_for_check(tokenizer, check_rows.select(range(min(MERGE_CHECK_ROWS, len(check_rows)))),
                                 cfg["max_seq_length"])
    # said before the merge starts: on a large model it is the run's longest silent stretch after training
    report(f"merging ({cfg['merge_base']} base), then checking it on {len(batches)} held-out rows "
           f"({sum(int(b['attention_mask'].sum()) for b in batches)} tokens)")
    _, nf4_config = build_quantization_plan(QuantMethod.QLORA)
    # within the memory training took: a checkpoint larger than the headroom left beside the check's own logits is
    # loaded offloaded (measured after the trained model is freed, when the reload is called)
    margin = check_logits_bytes(batches, model.config.get_text_config().vocab_size)
    reload = lambda path: load_merged_dir(path, None, device, cfg["trust_remote_code"],  # noqa: E731
                                          budget_bytes=headroom_bytes(device) - margin)
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
               f"{merge_check['mean_kl']:.3g} <= {_limit_words(merge_check)}")
    else:
        report(f"!!! MERGE CHECK FAILED: mean KL {merge_check['mean_kl']:.3g} > {_limit_words(merge_check)}; the "
               "merged model differs from the trained one by more than rounding. The adapter "
               "(adapter/, on the 4-bit base) is the primary artifact !!!")
        # what the primary artifact gives when reloaded on the 4-bit base by the same plan (the trained model was
        # freed for the check: one model in memory at a time)
        step("check", "the adapter reloaded on its base, for its fingerprint")
        artifact["fingerprints"]["adapter"] = logits_fingerprint(load_trained(), fingerprint_ids.tolist())
    return merge_check, artifact
