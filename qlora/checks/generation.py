"""A check on the trained model: does greedy generation on held-out prompts end, with an end-of-sequence
token, within a budget set by the reference completions? A model that never stops looks fine on loss and logits and
is useless in a chat loop."""

from __future__ import annotations

from typing import Any, Callable

from qlora.core.heap import freed_blocks_leave_the_heap
from qlora.core.logs import step


GENERATION_PROMPTS = 16  # held-out prompts generated from
GENERATION_SAMPLES = 3  # {prompt, output} pairs kept for metadata.json
MIN_NEW_TOKENS = 64  # the budget is max(this, 2 x the longest reference completion)
STOP_RATE_WARNING = 0.9  # below this, main() warns loudly
GENERATION_TIME_SHARE = 0.1  # the check's time limit, as a share of the training time ...
GENERATION_MIN_SECONDS = 30  # ... and at least this: a model that never stops costs no more

def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends generation: the tokenizer's eos token and the generation config's eos ids."""
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set()
    for source in (tokenizer.eos_token_id, config_ids):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return sorted(ids)

def prompt_and_reference(row: dict[str, Any]) -> tuple[list, list] | None:
    """A held-out trainer row as (prompt messages, reference completion messages): a conversational
    prompt/completion row, or a whole conversation ending with the assistant's reply; None for a text
    row, which has no prompt."""
    if "prompt" in row and "completion" in row:
        return row["prompt"], row["completion"]
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1:]
    return None

def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversational prompt rendered by the tokenizer's chat template, ready for the reply."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])

def new_token_budget(tokenizer, completions: list[list[dict[str, str]]]) -> int:
    """max(MIN_NEW_TOKENS, 2 x the longest reference completion's text in tokens)."""
    lengths = [len(tokenizer("".join(m["content"] for m in completion), add_special_tokens=False)["input_ids"])
               for completion in completions]
    return max(MIN_NEW_TOKENS, 2 * max(lengths, default=0))

def _left_padded(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask

def until_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """The generated tokens up to and including the first eos, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1], True
    return tokens, False

def generation_check(model, tokenizer, rows, max_prompts: int = GENERATION_PROMPTS, batch_size: int = 8,
                     max_seconds: float | None = None) -> dict[str, Any] | None:
    """Greedy generation on up to `max_prompts` held-out rows (a list or a datasets.Dataset of trainer
    rows, see `prompt_and_reference`), prompts rendered by `tokenizer`'s chat template, within `max_seconds`.

    Returns, for metadata.json: `prompts` (count), `stop_rate` (fraction that ended with an eos id, of the
    prompts the time limit did not cut; None if it cut all), `mean_new_tokens` (eos included), `max_new_tokens`
    (the budget each prompt had), `cut_by_time` (prompts the time limit stopped or never started), `seconds`,
    and `samples` (the first few {prompt, output} pairs, special tokens left out of the output). None when no
    row has a prompt (text rows).
    """
    import time

    import torch

    pairs = [pair for pair in map(prompt_and_reference, (rows[i] for i in range(len(rows)))) if pair is not None]
    examples = [{"prompt": prompt, "completion": completion} for prompt, completion in pairs[:max_prompts]]
    if not examples:
        return None
    budget = new_token_budget(tokenizer, [example["completion"] for example in examples])
    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:
        raise ValueError("the tokenizer and the generation config name no eos token: generation cannot stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    started = time.monotonic()
    deadline = started + (max_seconds if max_seconds is not None else float("inf"))
    outputs, cut = [], 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            cut += len(batch)
            continue
        input_ids, attention_mask = _left_padded([prompt_ids(tokenizer, example["prompt"]) for example in batch], pad_id)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       do_sample=False, max_new_tokens=budget, eos_token_id=eos_ids,
                                       pad_token_id=pad_id, max_time=None if max_seconds is None else remaining)
        for row in generated[:, input_ids.shape[1]:].cpu():
            tokens, stopped = until_eos(row.tolist(), set(eos_ids))
            timed_out = not stopped and len(tokens) < budget
            cut += timed_out
            outputs.append((tokens, stopped, timed_out))
    judged = [(tokens, stopped) for tokens, stopped, timed_out in outputs if not timed_out]
    lengths = [len(tokens) for tokens, _ in judged]
    return {
        "prompts": len(examples),
        "stop_rate": sum(stopped for _, stopped in judged) / len(judged) if judged else None,
        "mean_new_tokens": sum(lengths) / len(lengths) if lengths else None,
        "max_new_tokens": budget,
        "cut_by_time": cut,
        "seconds": round(time.monotonic() - started, 1),
        "samples": [{"prompt": example["prompt"][-1]["content"],
                     "output": tokenizer.decode(tokens, skip_special_tokens=True)}
                    for example, (tokens, _, _) in zip(examples[:GENERATION_SAMPLES], outputs)],
    }

def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])

def check_trained_generation(model, tokenizer, rows, train_seconds: float, batch_size: int,
                             report: Callable[[str], None] = lambda line: step("generate", "%s", line)) -> dict[str, Any] | None:
    """`generation_check` on the trained model as it is in memory (the adapter on its base: what the merged model
    computes up to the rounding the merge check bounds), so it loads nothing and takes no memory beyond training's;
    it gets GENERATION_TIME_SHARE of the training time, at least GENERATION_MIN_SECONDS, and generates `batch_size`
    prompts at a time (a training batch's rows: its KV cache and prefill stay below training's activations).
    `tokenizer` is the run's, as saved with the output. `generation_summary`'s lines go to `report`."""
    seconds = max(GENERATION_MIN_SECONDS, GENERATION_TIME_SHARE * train_seconds)
    report(f"greedy generation on held-out prompts with the trained model (at most {seconds:.0f}s)")
    model.eval()
    # The prefill hands the head the last position of each prompt as a strided view; on CPU, PyTorch's bf16
    # linear then made an fp32 copy of the whole head for it (Qwen3-0.6B: +0.58 GiB at each prompt batch, none
    # for a contiguous input). The same values, contiguous, cost nothing.
    hook = model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    try:
        with freed_blocks_leave_the_heap():  # the prefill's and the 4-bit repacking's buffers leave when freed
            check = generation_check(model, tokenizer, rows, batch_size=batch_size, max_seconds=seconds)
    finally:
        hook.remove()
    for line in generation_summary(check):
        report(line)
    return check

def generation_summary(check: dict[str, Any] | None) -> list[str]:
    """The log lines for a generation check: one summary, and a loud warning when too few prompts stopped."""
    if check is None:
        return ["skipped: no held-out row has a prompt to generate from"]
    if check["stop_rate"] is None:
        return [f"the time limit ({check['seconds']}s) cut all {check['prompts']} held-out prompts: no verdict"]
    cut = f"; {check['cut_by_time']} cut by the time limit, not counted" if check.get("cut_by_time") else ""
    took = f", {check['seconds']}s" if check.get("seconds") is not None else ""
    lines = [f"greedy generation on {check['prompts']} held-out prompts: {100 * check['stop_rate']:.0f}% ended with "
             f"eos, {check['mean_new_tokens']:.1f} new tokens on average (limit {check['max_new_tokens']}){took}{cut}"]
    if check["stop_rate"] < STOP_RATE_WARNING:
        lines.append(f"!!! GENERATION CHECK: only {100 * check['stop_rate']:.0f}% of held-out prompts ended with eos "
                     f"within {check['max_new_tokens']} new tokens (< {100 * STOP_RATE_WARNING:.0f}%): the model may "
                     "not stop in use; see metadata.json generation_check.samples !!!")
    return lines
