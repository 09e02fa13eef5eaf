"""The merge check's measures: logits of a model on held-out rows, their comparison with the trained model's
(max |logit diff|, mean KL, loss), and the logits fingerprints recorded in metadata.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from qlora.core.heap import release_free_heap
from qlora.data.chat_format import example_token_ids
from qlora.model.base_weights import dense_weight
from quantization_utils import short_dtype_name


def head_dtype_name(model) -> str:
    """Short name of the dtype lm_head really has: 'bf16' | 'fp16' | 'fp32'."""

    return short_dtype_name(str(model.get_output_embeddings().weight.dtype))


def logits_on(model, batches) -> list:
    """fp32 logits of `model` on each batch (dicts of input_ids / attention_mask), on CPU."""
    import torch

    # an offloaded model's first parameters may be on "meta" (kept in the files): inputs go where weights run
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), "cpu")
    outputs = []
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs.append(model(**batch).logits.cpu().float())  # upcast on the host: the device holds bf16 only
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


def check_logits_bytes(batches, vocab_size: int) -> int:
    """Memory one candidate's measurement takes beside its weights: CHECK_ROW_COPIES fp32 copies of the longest
    row's logits."""
    longest = max((int(batch["input_ids"].shape[1]) for batch in batches), default=0)
    return CHECK_ROW_COPIES * 4 * longest * vocab_size


# The rounding floor: each decoder weight of the trained model is rounded to bf16 again after a relative
# perturbation drawn uniformly from +-ROUNDING_NOISE, about one bf16 step (2**-8 to 2**-7 of |w|): an error of the
# size and kind that storing W + delta in bf16 makes. The merge passes while its mean KL is within FLOOR_MULTIPLE
# of the KL this perturbation alone causes (or within merge_check_max_kl).
ROUNDING_NOISE = 2.0**-8
FLOOR_MULTIPLE = 4.0
# fp32 copies of one row's logits while a candidate is compared: its logits, the masked reference and candidate,
# their difference and its square, two log-softmaxes and the KL product
CHECK_ROW_COPIES = 8


def _rerounded_output(module, args, output):
    """A Linear's (or 4-bit Linear's) output as computed with its dense weight re-rounded (seeded per layer)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(module._floor_seed)
    weight = dense_weight(module)
    noise = torch.rand(weight.shape, generator=generator).to(weight.device).sub_(0.5).mul_(2 * ROUNDING_NOISE)
    weight = weight.add_(weight * noise).to(output.dtype)
    del noise
    bias = module.bias.to(output.dtype) if module.bias is not None else None
    return torch.nn.functional.linear(args[0].to(output.dtype), weight, bias)


def _decoder_linears(model) -> list:
    """The Linear layers (plain or 4-bit) that hold decoder weights: not the head, not an adapter's A or B."""
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    return [module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and module is not head
            and ".lora_" not in name and module.weight.device.type != "meta"]


def _rerounded_logits(model, linears, batch):
    hooks = []
    for i, module in enumerate(linears):
        module._floor_seed = i
        hooks.append(module.register_forward_hook(_rerounded_output))
    try:
        (logits,) = logits_on(model, [batch])
    finally:
        for hook in hooks:
            hook.remove()
    return logits


class SpilledLogits:
    """The trained model's fp32 logits of each check row, kept in files under `directory` and read back one row at
    a time: at a 152k vocabulary a token's logits take 0.6 MB, and the merge and the check hold none of them."""

    def __init__(self, directory: Path):
        self.directory, self.count = Path(directory), 0
        self.directory.mkdir(parents=True, exist_ok=True)

    def append(self, logits) -> None:
        from safetensors.torch import save_file

        save_file({"logits": logits.contiguous()}, str(self.directory / f"{self.count}.safetensors"))
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        from safetensors.torch import load_file

        for i in range(self.count):
            yield load_file(str(self.directory / f"{i}.safetensors"))["logits"]


def trained_reference(model, batches, directory: Path) -> tuple[SpilledLogits, float, float]:
    """The trained model's logits of each check row (spilled to `directory`), their loss, and the rounding floor:
    the mean per-token KL(trained || trained with every decoder weight re-rounded, `_rerounded_output`)."""
    linears = _decoder_linears(model)
    logits, floor, losses = SpilledLogits(directory), [], []
    for batch in batches:
        (ref,) = logits_on(model, [batch])
        losses.append(_loss_sum(ref, batch))
        floor.append(_comparison_sums(ref, _rerounded_logits(model, linears, batch), batch))
        logits.append(ref)
        del ref
    return logits, sum(t for t, _ in losses) / max(sum(c for _, c in losses), 1), _comparison(floor)["mean_kl"]


def measure_candidate(model, trained_logits, batches) -> dict[str, Any]:
    """Merge-check figures of one candidate against the trained model's logits, one batch at a time (only one
    row of the trained model's logits is read at a time)."""
    parts, losses = [], []
    for ref, batch in zip(trained_logits, batches):
        (cand,) = logits_on(model, [batch])
        parts.append(_comparison_sums(ref, cand, batch))
        losses.append(_loss_sum(cand, batch))
        del cand, ref
    return {**_comparison(parts), "loss": sum(t for t, _ in losses) / max(sum(c for _, c in losses), 1)}


def kl_limit(rounding_floor_kl: float, max_kl: float) -> float:
    """The mean KL a merge may reach: merge_check_max_kl, or FLOOR_MULTIPLE x the rounding floor when that is
    larger (a large-vocabulary model's bf16 rounding alone can exceed a fixed limit)."""
    return max(max_kl, FLOOR_MULTIPLE * rounding_floor_kl)


def measure_saved(directory: Path, reload: Callable[[Path], Any], trained_logits: list, batches,
                  fingerprint_ids: list[int]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A saved model directory, reloaded by `reload` as a user loads it, measured against the trained model:
    (merge-check figures, logits fingerprint, lm_head dtype name). The reloaded model is freed before
    returning."""
    import gc

    release_free_heap()  # the model that wrote `directory` was just freed: its memory leaves before the reload
    model = reload(directory)
    figures = measure_candidate(model, trained_logits, batches)
    fingerprint = logits_fingerprint(model, fingerprint_ids)
    head = head_dtype_name(model)
    del model
    gc.collect()
    release_free_heap()
    return figures, fingerprint, head


def tokenize_for_check(tokenizer, examples, max_length: int) -> list[dict]:
    """Held-out rows (conversations or text) as single-sequence batches for the merge check, tokenized exactly
    as the trainer tokenized them."""
    import torch

    batches = []
    for example in examples:
        ids = torch.tensor([example_token_ids(tokenizer, example)[:max_length]])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


MERGE_CHECK_ROWS = 8  # held-out rows the merge check compares the merged model with the trained one on
