"""The merge check's measures: logits of a model on held-out rows, their comparison with the trained model's
(max |logit diff|, mean KL, loss), and the logits fingerprints recorded in metadata.json."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

from qlora.core.heap import freed_blocks_leave_the_heap, release_free_heap
from qlora.data.chat_format import example_token_ids
from qlora.model.base_weights import dense_weight
from quantization_utils import short_dtype_name


def head_dtype_name(model) -> str:
    """Short name of the dtype lm_head really has: 'bf16' | 'fp16' | 'fp32'."""

    return short_dtype_name(str(model.get_output_embeddings().weight.dtype))


def input_device(model):
    """Where a model's inputs go: the device of its first parameter in memory (an offloaded model's first
    parameters may be on "meta", kept in the files)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), "cpu")


def logits_on(model, batches) -> list:
    """Logits of `model` on each batch (dicts of input_ids / attention_mask), on CPU, in the dtype the model
    computed them in (bf16, or fp16 for an fp16 head): their fp32 upcast is exact, so the comparisons make it a
    chunk at a time instead of holding a row in fp32 (a 256-token row at a 262k vocabulary: 0.25 GiB)."""
    import torch

    device = input_device(model)
    outputs = []
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs.append(model(**batch).logits.cpu())
    return outputs


# Tokens compared at a time: the comparison's CHECK_ROW_COPIES fp32 copies are of a chunk, not of a row (at a 262k
# vocabulary, 4 tokens' copies take 32 MiB, 16 tokens' 128 MiB)
COMPARE_CHUNK_TOKENS = 4
HEAD_CHUNK_TOKENS = 16  # positions the head is applied to at a time (each call reads the whole head)
# Families whose logits are the head applied to the decoder's last hidden states, then (Gemma 2 and 3) softcapped
# by `final_logit_softcapping`: their logits can be made a chunk of positions at a time (`logit_chunks`)
HEAD_ONLY_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})


class _HeadReached(Exception):
    """Raised from the head's forward pre-hook: the decoder's work is done, the head's input is captured."""


def _logits_after_head(model):
    """What the model's forward does to the head's output, as a function; None for a family not known to be only
    the head (and Gemma's softcapping)."""
    import torch

    config = model.config.get_text_config()
    if config.model_type not in HEAD_ONLY_FAMILIES:
        return None
    cap = getattr(config, "final_logit_softcapping", None)
    if not cap:
        return lambda logits: logits
    return lambda logits: torch.tanh(logits / cap) * cap  # as transformers' Gemma forward writes it


def logit_chunks(model, batch, chunk: int = HEAD_CHUNK_TOKENS):
    """(start, logits of positions start..start+chunk on CPU) of a one-row batch, a chunk at a time: the decoder
    runs once and the head is applied to `chunk` positions at a time, so a row's logits over a large vocabulary
    (256 tokens x 262k: 0.13 GiB in bf16) are never held. Families outside HEAD_ONLY_FAMILIES give chunks of
    the whole row's logits."""
    import torch

    head, after_head = model.get_output_embeddings(), _logits_after_head(model)
    if after_head is None:
        (logits,) = logits_on(model, [batch])
        for start in range(0, logits.shape[1], chunk):
            yield start, logits[0, start:start + chunk]
        return
    captured = {}

    def stop_at_head(module, args):
        captured["hidden"] = args[0]
        raise _HeadReached

    hook = head.register_forward_pre_hook(stop_at_head)
    try:
        with torch.no_grad():
            model(**{k: v.to(input_device(model)) for k, v in batch.items()})
    except _HeadReached:
        pass
    finally:
        hook.remove()
    hidden = captured["hidden"]
    with torch.no_grad():
        for start in range(0, hidden.shape[1], chunk):
            yield start, after_head(head(hidden[:, start:start + chunk].contiguous()))[0].cpu()


def _comparison_sums(ref, cand, batch) -> dict[str, float]:
    """One batch's share of `compare_logits`: sums and maxima over its non-padding tokens, taken
    COMPARE_CHUNK_TOKENS at a time (at a 152k vocabulary a whole row's log-softmaxes took 1.2 GiB at 256 tokens)."""
    mask = batch["attention_mask"].reshape(-1).bool()
    ref, cand = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
    if not bool(mask.all()):
        ref, cand = ref[mask], cand[mask]
    sums = _empty_sums()
    for start in range(0, ref.shape[0], COMPARE_CHUNK_TOKENS):
        _add_chunk(sums, ref[start:start + COMPARE_CHUNK_TOKENS], cand[start:start + COMPARE_CHUNK_TOKENS])
    return sums


def _empty_sums() -> dict[str, float]:
    return {"max_abs": 0.0, "max_logit": 0.0, "diff_sq": 0.0, "ref_sq": 0.0, "kl_sum": 0.0, "tokens": 0}


def _add_chunk(sums: dict[str, float], ref, cand) -> None:
    """Add a chunk of tokens (reference and candidate logits, [tokens, vocab], any float dtype) to `sums`, in fp32."""
    import torch

    if ref.shape[0] == 0:
        return
    r, c = ref.float(), cand.float()
    diff = r - c
    ref_logp, cand_logp = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
    sums["max_abs"] = max(sums["max_abs"], diff.abs().max().item())
    sums["max_logit"] = max(sums["max_logit"], r.abs().max().item())
    sums["diff_sq"] += diff.pow(2).sum().item()
    sums["ref_sq"] += r.pow(2).sum().item()
    sums["kl_sum"] += (ref_logp.exp() * (ref_logp - cand_logp)).sum().item()
    sums["tokens"] += r.shape[0]


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
    logits, labels = out[:, :-1].flatten(0, 1), labels.flatten()
    total = sum(torch.nn.functional.cross_entropy(logits[i:i + COMPARE_CHUNK_TOKENS].float(),
                                                  labels[i:i + COMPARE_CHUNK_TOKENS], reduction="sum",
                                                  ignore_index=-100).item()
                for i in range(0, len(labels), COMPARE_CHUNK_TOKENS))
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
                                "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long)}])[0][0].float()
    return {"input_ids": list(input_ids), "logits_head": logits[:, :FINGERPRINT_VOCAB].tolist(),
            "argmax": logits.argmax(-1).tolist(), "abs_sum": logits.abs().sum().item()}


def fingerprint_difference(recorded: dict[str, Any], actual: dict[str, Any]) -> float:
    """Max |difference| between two fingerprints' logits (inf when they were taken on other inputs)."""
    import torch

    if recorded["input_ids"] != actual["input_ids"]:
        return float("inf")
    return (torch.tensor(recorded["logits_head"]) - torch.tensor(actual["logits_head"])).abs().max().item()


def comparison_bytes(row_tokens: int, vocab_size: int) -> int:
    """Host memory of comparing one row: the reference's and the candidate's bf16 logits, and CHECK_ROW_COPIES
    fp32 copies of a chunk of them."""
    return vocab_size * (2 * 2 * row_tokens + 4 * CHECK_ROW_COPIES * min(row_tokens, COMPARE_CHUNK_TOKENS))


def check_logits_bytes(batches, vocab_size: int) -> int:
    """Memory one candidate's measurement takes beside its weights: `comparison_bytes` of the longest row."""
    return comparison_bytes(max((int(batch["input_ids"].shape[1]) for batch in batches), default=0), vocab_size)


# The rounding floor: the KL that moving each decoder weight of the trained model by one bf16 step causes.
# Storing W + delta in bf16 moves each weight by at most half a step (and loses a delta smaller than that): a
# merge whose KL is within FLOOR_MULTIPLE of the floor differs from the trained model by rounding alone. The
# merge passes within that, or within merge_check_max_kl.
FLOOR_MULTIPLE = 1.0
FLOOR_ROWS = 2  # check rows the floor is measured on: each costs a forward that dequantizes every layer
# fp32 copies of a chunk of logits while it is compared: the difference and its square, two log-softmaxes, the
# exponent and the KL product, |difference|, the reference squared
CHECK_ROW_COPIES = 8


def _rerounded_output(module, args, output):
    """A Linear's (or 4-bit Linear's) output as computed with every element of its bf16 weight moved one bf16
    step up or down (the sign drawn per element, seeded per layer): the largest error bf16 rounding can make,
    twice over, on every weight at once."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(module._floor_seed)
    weight = dense_weight(module, keep_layout=True).to(torch.bfloat16)
    steps = torch.randint(0, 2, weight.shape, generator=generator, dtype=torch.int16).mul_(2).sub_(1)
    steps = steps.to(weight.device).mul_(weight != 0)  # the bit pattern of a zero has no step below it
    weight = weight.view(torch.int16).add_(steps).view(torch.bfloat16).to(output.dtype)
    del steps
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

    @contextmanager
    def row(self, i: int):
        """Row i's logits ([1, tokens, vocab]) as a slice that reads only what is indexed, with pread (a memory map
        would keep every page read resident until the row is done)."""
        from safetensors import safe_open

        with safe_open(str(self.directory / f"{i}.safetensors"), framework="pt", device="cpu", backend="pread") as f:
            yield f.get_slice("logits")


def _reference_row(reference, i: int):
    """Row i of reference logits, sliceable as [1, tokens, vocab]: read a chunk at a time from SpilledLogits, or a
    tensor already in memory (a list of them)."""
    return reference.row(i) if isinstance(reference, SpilledLogits) else nullcontext(reference[i])


def trained_reference(model, batches, directory: Path) -> tuple[SpilledLogits, float, float]:
    """The trained model's logits of each check row (spilled to `directory`), their loss, and the rounding floor:
    the mean per-token KL(trained || trained with every decoder weight re-rounded, `_rerounded_output`)."""
    linears = _decoder_linears(model)
    logits, floor, losses = SpilledLogits(directory), [], []
    with freed_blocks_leave_the_heap():  # each row's logits and each layer's re-rounded copy leave when freed
        for i, batch in enumerate(batches):
            (ref,) = logits_on(model, [batch])
            release_free_heap()  # the forward's small blocks: freed heap that the next forward re-touches stays resident
            losses.append(_loss_sum(ref, batch))
            if i < FLOOR_ROWS:
                floor.append(_comparison_sums(ref, _rerounded_logits(model, linears, batch), batch))
            logits.append(ref)
            del ref
            release_free_heap()
    return logits, sum(t for t, _ in losses) / max(sum(c for _, c in losses), 1), _comparison(floor)["mean_kl"]


def measure_candidate(model, trained_logits, batches) -> dict[str, Any]:
    """Merge-check figures of one candidate against the trained model's logits (SpilledLogits, or a list of
    tensors), a chunk of positions at a time on both sides (`logit_chunks`, `SpilledLogits.row`): the candidate's
    row of logits is never held whole, nor a spilled reference row. The rows are single sequences without
    padding (`tokenize_for_check`)."""
    import torch

    sums, loss, loss_tokens = _empty_sums(), 0.0, 0
    with freed_blocks_leave_the_heap():  # the chunks' buffers leave when freed, not kept by the heap
        for i, batch in enumerate(batches):
            input_ids = batch["input_ids"][0]
            with _reference_row(trained_logits, i) as reference:
                for start, cand in _compared_chunks(model, batch):
                    _add_chunk(sums, reference[0:1, start:start + cand.shape[0]][0], cand)
                    labels = input_ids[start + 1:start + cand.shape[0] + 1]  # position t predicts token t + 1
                    if len(labels):  # the last position predicts none
                        loss += torch.nn.functional.cross_entropy(cand[:len(labels)].float(), labels,
                                                                  reduction="sum").item()
                        loss_tokens += len(labels)
            release_free_heap()
    return {**_comparison([sums]), "loss": loss / max(loss_tokens, 1)}


def _compared_chunks(model, batch):
    """(start, logits) of a one-row batch COMPARE_CHUNK_TOKENS positions at a time, the head run HEAD_CHUNK_TOKENS
    positions at a time (`logit_chunks`)."""
    for head_start, head_chunk in logit_chunks(model, batch):
        for offset in range(0, head_chunk.shape[0], COMPARE_CHUNK_TOKENS):
            yield head_start + offset, head_chunk[offset:offset + COMPARE_CHUNK_TOKENS]


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
