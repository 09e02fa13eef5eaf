"""End to end: base models without a chat template train on messages, prompt_completion and text files; bad rows
fail with one line before any weights load, and nothing is written."""

import json
import shutil

import pytest

from qlora.data.chat_format import plain_chat_template
from conftest import FAST_TRAIN_ARGS, OPENMATH_SAMPLE, SQUAD_SAMPLE, run_train
from qlora.data.formats import squad_prompt

ARGS = [*FAST_TRAIN_ARGS, "--max_steps=4", "--lora_r=8"]


def sample_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """One file per generic format, made from the shipped samples (openmath for messages and text, squad for pairs)."""
    folder = tmp_path_factory.mktemp("data")
    math, squad = sample_rows(OPENMATH_SAMPLE), sample_rows(SQUAD_SAMPLE)
    system = {"role": "system", "content": "Solve the problem."}
    chats = [{"messages": [system, {"role": "user", "content": a["problem"]},
                           {"role": "assistant", "content": a["generated_solution"]},
                           {"role": "user", "content": b["problem"]},
                           {"role": "assistant", "content": b["generated_solution"]}]}
             for a, b in zip(math[::2], math[1::2])]
    pairs = [{"prompt": squad_prompt(r["context"], r["question"]), "completion": r["answers"]["text"][0]} for r in squad]
    texts = [{"text": r["generated_solution"]} for r in math]
    return {"messages": write_jsonl(folder / "math_chats.jsonl", chats),
            "prompt_completion": write_jsonl(folder / "squad_pairs.jsonl", pairs),
            "text": write_jsonl(folder / "math_text.jsonl", texts)}


def no_weights(model_dir, tmp_path):
    """The model's config and tokenizer without its weights: any weight load would fail loudly."""
    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    (copy / "model.safetensors").unlink()
    return copy


@pytest.fixture(scope="module")
def trained(llama_base_dir, data_files, tmp_path_factory):
    """trained(choice) -> (OUTPUT_ROOT, result) of one run of the tiny Llama base on that format's file."""
    runs = {}

    def train(choice):
        if choice not in runs:
            out = tmp_path_factory.mktemp("outputs")
            runs[choice] = out, run_train([f"--MODEL_NAME={llama_base_dir}", f"--DATASET_CHOICE={choice}",
                                           f"--DATASET_PATH={data_files[choice]}", f"--OUTPUT_ROOT={out}", *ARGS])
        return runs[choice]
    return train


# qlora.checks.logits.tokenize_for_check builds the merge check's inputs from prompt + completion, which text rows do not
# have; it should take chat_format.example_token_ids(tokenizer, example)[:max_length] (the sequence trained on).
@pytest.mark.parametrize("choice, word", [("messages", "math-chats"), ("prompt_completion", "squad-pairs"),
                                          ("text", "math-text")])
def test_base_model_without_chat_template_trains_end_to_end(trained, data_files, choice, word):
    from transformers import AutoTokenizer

    out, result = trained(choice)
    assert result.returncode == 0, result.stderr[-3000:]
    name = f"tiny-llama-base-{word}_SFT_LoRa8_QLORA_w4_headbf16"
    assert [p.name for p in out.iterdir()] == [name]
    meta = json.loads((out / name / "metadata.json").read_text())
    assert meta["dataset"]["name"] == choice and meta["dataset"]["word"] == word
    assert meta["dataset"]["path"] == str(data_files[choice].resolve()) and meta["dataset"]["cut_rows"] == 0
    assert meta["dataset"]["format"] == ("text" if choice == "text" else "prompt_completion")
    assert meta["dataset"]["prompt_format"] == "plain"
    assert meta["training"]["steps"] == 4 and meta["merge_check"]["passed"]
    assert AutoTokenizer.from_pretrained(out / name).chat_template == plain_chat_template(with_bos=True)


def test_evaluate_prompts_with_the_saved_plain_format(trained, data_files):
    from tools.evaluate import main as evaluate

    out, result = trained("messages")
    assert result.returncode == 0, result.stderr[-3000:]
    directory = next(out.iterdir())
    (scored,) = evaluate([str(directory), "--limit=2", "--max-new-tokens=4"])
    assert scored["dataset"]["name"] == "messages" and scored["rows"] == 2 and scored["dataset"]["eval_rows"] == 16
    assert scored["heldout_loss"] > 0 and "accuracy" not in scored and "f1" not in scored
    assert scored["examples"][0]["prompt"] in {row["messages"][3]["content"]
                                               for row in map(json.loads, data_files["messages"].read_text().splitlines())}


def test_gemma_style_base_model_trains_end_to_end(gemma_base_dir, data_files, tmp_path):
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={gemma_base_dir}", "--DATASET_CHOICE=prompt_completion",
                        f"--DATASET_PATH={data_files['prompt_completion']}", f"--OUTPUT_ROOT={out}", *ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["tiny-gemma-base-squad-pairs_SFT_LoRa8_QLORA_w4_headbf16"]


@pytest.mark.parametrize("choice, row, expected", [
    ("prompt_completion", {"prompt": "Q", "completion": None}, "row 3: 'completion' is null (expected a non-empty string)"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}]},
     "row 3: 'messages' has no assistant message (expected at least one, ending the conversation)"),
    ("text", {"text": "   "}, "row 3: 'text' is whitespace only (expected a non-empty string)"),
    ("openmath", {"problem": "1+1?", "generated_solution": "2", "expected_answer": None},
     "row 3: 'expected_answer' is null (expected a non-empty string)"),
])
def test_bad_rows_fail_before_weights_load_and_write_nothing(llama_base_dir, data_files, tmp_path, choice, row,
                                                             expected):
    source = data_files.get(choice, OPENMATH_SAMPLE)
    rows = sample_rows(source)[:2] + [row] + sample_rows(source)[2:10]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={no_weights(llama_base_dir, tmp_path)}", f"--DATASET_CHOICE={choice}",
                        f"--DATASET_PATH={bad}", f"--OUTPUT_ROOT={out}", *ARGS])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad} {expected}", result.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_tokenizer_without_template_or_eos_fails_before_weights_load(llama_base_dir, data_files, tmp_path):
    model = no_weights(llama_base_dir, tmp_path)
    config_file = model / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["eos_token"] = None
    config_file.write_text(json.dumps(tokenizer_config))
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={model}", "--DATASET_CHOICE=text", f"--DATASET_PATH={data_files['text']}",
                        f"--OUTPUT_ROOT={out}", *ARGS])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the tokenizer of {model} has neither a chat template nor an EOS token: a completion needs an end "
        "token to be learned; use a tokenizer that defines eos_token"), result.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_generic_format_without_a_path_is_one_line(llama_base_dir, tmp_path):
    result = run_train([f"--MODEL_NAME={llama_base_dir}", "--DATASET_CHOICE=messages", f"--OUTPUT_ROOT={tmp_path}"])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: DATASET_CHOICE=messages needs DATASET_PATH: a .jsonl/.json/.parquet/.csv file or a hub dataset id")
