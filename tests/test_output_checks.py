"""The generation check (greedy generation on held-out prompts: does the saved model stop?) and the
checks that vouch for an output measured on the directory as a user reloads it, on three model families."""

import json

import pytest

from conftest import OPENMATH_SAMPLE, run_python, run_train
from qlora.checks.generation import (MIN_NEW_TOKENS, eos_token_ids, generation_check, generation_summary, new_token_budget,
                           prompt_and_reference, prompt_ids)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from qlora.model.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir), None, "cpu").eval(), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def held_out():
    from qlora.data.formats import load_rows, to_sft_dataset

    return to_sft_dataset(load_rows("openmath", OPENMATH_SAMPLE, 20), "openmath")


def test_left_padded_batches_generate_what_single_prompts_do(tiny, held_out):
    """Prompts of different lengths batched together (left padding, attention mask) give the same
    greedy outputs as one prompt at a time."""
    model, tokenizer = tiny
    examples = held_out.select(range(6))
    assert len({len(prompt_ids(tokenizer, e["prompt"])) for e in examples}) > 1
    batched, single = (generation_check(model, tokenizer, examples, batch_size=n) for n in (6, 1))
    assert {**batched, "seconds": 0} == {**single, "seconds": 0}
    assert batched["prompts"] == 6 and len(batched["samples"]) == 3


def test_an_eos_id_of_the_generation_config_ends_generation(tiny, held_out):
    """The random model's first greedy token, made an eos id of its generation config (not the
    tokenizer's), stops it after one token; without it the model runs to the budget."""
    import torch

    model, tokenizer = tiny
    example = held_out.select(range(1))
    with torch.no_grad():
        first = model(torch.tensor([prompt_ids(tokenizer, example[0]["prompt"])])).logits[0, -1].argmax().item()
    before = generation_check(model, tokenizer, example, batch_size=1)
    assert before["stop_rate"] == 0.0 and before["mean_new_tokens"] == before["max_new_tokens"]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first]
    try:
        assert eos_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, first})
        after = generation_check(model, tokenizer, example, batch_size=1)
    finally:
        model.generation_config.eos_token_id = saved
    assert after["stop_rate"] == 1.0 and after["mean_new_tokens"] == 1


def test_a_model_that_never_stops_is_cut_by_the_time_limit(tiny, held_out):
    """The random model never emits eos: given a third of the time one batch takes, the check stops in time, the
    prompts it cut are counted apart and left out of the stop rate, and the summary says so."""
    import time

    model, tokenizer = tiny
    rows = held_out.select(range(6))
    started = time.monotonic()
    unlimited = generation_check(model, tokenizer, rows.select(range(2)), batch_size=2)
    one_batch = time.monotonic() - started
    assert unlimited["cut_by_time"] == 0 and unlimited["stop_rate"] == 0.0
    started = time.monotonic()
    limited = generation_check(model, tokenizer, rows, batch_size=2, max_seconds=one_batch / 3)
    assert time.monotonic() - started < one_batch
    assert limited["cut_by_time"] == 6 and limited["stop_rate"] is None
    assert "no verdict" in generation_summary(limited)[0]


def test_budget_is_twice_the_longest_reference_with_a_floor(tiny):
    _, tokenizer = tiny
    short = [{"role": "assistant", "content": "42"}]
    long_text = " ".join(str(n) for n in range(200))
    long = [{"role": "assistant", "content": long_text}]
    assert new_token_budget(tokenizer, [short]) == MIN_NEW_TOKENS
    assert new_token_budget(tokenizer, [short, long]) == 2 * len(tokenizer(long_text, add_special_tokens=False)["input_ids"])


def test_summary_warns_loudly_below_ninety_percent():
    check = {"prompts": 16, "stop_rate": 0.875, "mean_new_tokens": 40.0, "max_new_tokens": 64, "cut_by_time": 0,
             "seconds": 3.2}
    lines = generation_summary(check)
    assert len(lines) == 2 and "88% ended with eos" in lines[0] and lines[1].startswith("!!! GENERATION CHECK")
    assert "cut by the time limit" in generation_summary({**check, "cut_by_time": 2})[0]
    assert len(generation_summary({**check, "stop_rate": 0.9})) == 1
    assert generation_summary(None) == ["skipped: no held-out row has a prompt to generate from"]


def test_rows_of_every_trainer_form_give_a_prompt_or_none():
    prompt, reply = [{"role": "user", "content": "2 + 3?"}], [{"role": "assistant", "content": "5"}]
    assert prompt_and_reference({"prompt": prompt, "completion": reply}) == (prompt, reply)
    assert prompt_and_reference({"messages": prompt + reply}) == (prompt, reply)
    assert prompt_and_reference({"text": "2 + 3 = 5"}) is None


# Families besides Qwen3 (tests/test_train_e2e.py): Llama (untied-style rotary, SiLU MLP) and Gemma 3
# (embedding scaled by sqrt(hidden), norms scaling by 1 + weight, sliding and full attention layers with
# their own rotary bases). initializer_range 0.1 makes the logits depend visibly on the rotary buffers:
# rounded to bf16 instead of the fp32 every load computes, they moved these fingerprints by 0.019 (Llama)
# and 0.023 (Gemma 3), and by 0.0 once the merge left them alone.
FAMILIES = {
    "llama": ("Llama-tiny", {}),
    "gemma3_text": ("Gemma3-tiny", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 32}),
}
FAMILY_TRAIN_ARGS = ["--max_steps=4", "--per_device_train_batch_size=4", "--gradient_accumulation_steps=1",
                     "--learning_rate=2e-3", "--logging_steps=2", "--max_seq_length=128", "--eval_samples=8",
                     "--max_train_samples=60", "--merge_base=auto"]


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """Each family's tiny random model trained with QLoRA through 01_Train.py, merged (both bases checked)."""
    from qlora.model.fixtures import build_random_model, tokenizer_corpus, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), 512)
    root = tmp_path_factory.mktemp("families")
    runs = {}
    for model_type, (name, dimensions) in FAMILIES.items():
        build_random_model(root / "models" / name, tokenizer, model_type=model_type, initializer_range=0.1, **dimensions)
        result = run_train([f"--MODEL_NAME={root / 'models' / name}", f"--DATASET_PATH={OPENMATH_SAMPLE}",
                            f"--OUTPUT_ROOT={root / 'out'}", *FAMILY_TRAIN_ARGS])
        assert result.returncode == 0, result.stderr[-3000:]
        directory = root / "out" / f"{name}-openmath_SFT_LoRa256_QLORA_w4_headbf16"
        runs[model_type] = directory, json.loads((directory / "metadata.json").read_text()), result.stderr
    return runs


def test_families_merge_and_reload_with_the_recorded_logits(family_runs):
    """Plain from_pretrained in a fresh process gives the logits metadata.json recorded, and the merge
    check passed on the reloaded directory."""
    code = f"""
import json
from transformers import AutoModelForCausalLM
from qlora.checks.logits import fingerprint_difference, logits_fingerprint
for directory in {[str(d) for d, _, _ in family_runs.values()]!r}:
    recorded = json.load(open(directory + "/metadata.json"))["artifact"]["fingerprints"]["merged"]
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    print("RESULT", json.dumps([type(model).__name__, str(model.dtype),
                                fingerprint_difference(recorded, logits_fingerprint(model, recorded["input_ids"]))]))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line.split("RESULT", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert [row[0] for row in rows] == ["LlamaForCausalLM", "Gemma3ForCausalLM"]
    for (model_class, dtype, difference), (_, meta, _) in zip(rows, family_runs.values()):
        assert dtype == "torch.bfloat16" and difference <= 1e-3, (model_class, difference)
        check = meta["merge_check"]
        assert check["passed"] and meta["artifact"]["primary"] == "merged"
        assert check["candidates"]["dequantized"]["mean_kl"] < 1e-3, (model_class, check["candidates"])


def test_generation_check_is_recorded_and_logged(family_runs):
    """Random models do not stop: each run records the check on its 8 held-out prompts and warns loudly."""
    for _, meta, log in family_runs.values():
        check = meta["generation_check"]
        assert check["prompts"] == 8 and len(check["samples"]) == 3 and check["max_new_tokens"] >= MIN_NEW_TOKENS
        assert 0 <= check["stop_rate"] < 0.9 and 1 <= check["mean_new_tokens"] <= check["max_new_tokens"]
        assert f"generate | greedy generation on 8 held-out prompts: {100 * check['stop_rate']:.0f}% ended" in log
        assert "!!! GENERATION CHECK: only" in log
