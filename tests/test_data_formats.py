"""Data files in every supported format and schema: read, checked row by row, converted; hostile input is one line."""

import csv
import json

import pytest

from qlora.core.errors import ConfigError
from qlora.config import validate_config
from qlora.data.formats import (MAX_CHARS_PER_TOKEN, cut_example, dataset_tag, load_rows, load_training_data,
                        resolve_source)
from qlora.core.errors import UserError
from qlora.model.fixtures import train_bpe_tokenizer

GOOD_PC = {"prompt": "What is 2 + 3?", "completion": "5"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}]


@pytest.fixture(scope="module")
def chat_tokenizer():
    return train_bpe_tokenizer(["What is 2 + 3? The answer is 5. Hello, be brief."] * 20, 300)


def config(choice, path, **changes):
    return {"DATASET_CHOICE": choice, "DATASET_PATH": None if path is None else str(path), "max_train_samples": 100,
            "eval_samples": 2, "seed": 42, "max_seq_length": 128, "MODEL_NAME": "tiny", **changes}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def jsonl_bytes(*rows):
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


# (case, DATASET_CHOICE, file name, file content, the error after the path)
HOSTILE = [
    ("null", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, {"prompt": None, "completion": "5"}),
     " row 2: 'prompt' is null (expected a non-empty string)"),
    ("empty string", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, {"prompt": "Q", "completion": ""}),
     " row 2: 'completion' is empty (expected a non-empty string)"),
    ("whitespace", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, {"prompt": " \n\t", "completion": "5"}),
     " row 2: 'prompt' is whitespace only (expected a non-empty string)"),
    ("integer", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, GOOD_PC, {"prompt": "Q", "completion": 5}),
     " row 3: 'completion' is an integer (5) (expected a non-empty string)"),
    ("missing column", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, {"prompt": "Q"}),
     " row 2: 'completion' is missing (the prompt_completion format needs prompt, completion)"),
    ("row not an object", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, [1, 2]),
     " row 2 is a list of 2, not an object (expected the columns prompt, completion)"),
    ("text null", "text", "data.jsonl", jsonl_bytes({"text": "a b"}, {"text": None}),
     " row 2: 'text' is null (expected a non-empty string)"),
    ("messages a string", "messages", "data.jsonl", jsonl_bytes({"messages": CHAT}, {"messages": "Hi"}),
     " row 2: 'messages' is the string 'Hi' (expected a list of {role, content} messages)"),
    ("messages empty", "messages", "data.jsonl", jsonl_bytes({"messages": []}),
     " row 1: 'messages' is an empty list (expected a list of {role, content} messages)"),
    ("message not an object", "messages", "data.jsonl", jsonl_bytes({"messages": ["Hi", CHAT[2]]}),
     " row 1: 'messages' message 1 is the string 'Hi' (expected an object with role and content)"),
    ("unknown role", "messages", "data.jsonl", jsonl_bytes({"messages": [CHAT[1], {"role": "bot", "content": "x"}]}),
     " row 1: 'messages' message 2 has role 'bot' (expected one of system, user, assistant)"),
    ("no role", "messages", "data.jsonl", jsonl_bytes({"messages": [{"content": "x"}, CHAT[2]]}),
     " row 1: 'messages' message 1 has no role (expected one of system, user, assistant)"),
    ("null content", "messages", "data.jsonl", jsonl_bytes({"messages": [{"role": "user", "content": None}, CHAT[2]]}),
     " row 1: 'messages' message 1 (user) content is null (expected a non-empty string)"),
    ("no content", "messages", "data.jsonl", jsonl_bytes({"messages": [{"role": "user"}, CHAT[2]]}),
     " row 1: 'messages' message 1 (user) has no content (expected a non-empty string)"),
    ("integer content", "messages", "data.jsonl", jsonl_bytes({"messages": [CHAT[1], {"role": "assistant", "content": 3}]}),
     " row 1: 'messages' message 2 (assistant) content is an integer (3) (expected a non-empty string)"),
    ("no assistant turn", "messages", "data.jsonl", jsonl_bytes({"messages": CHAT}, {"messages": CHAT[:2]}),
     " row 2: 'messages' has no assistant message (expected at least one, ending the conversation)"),
    ("ends with a user turn", "messages", "data.jsonl", jsonl_bytes({"messages": CHAT[:4]}),
     " row 1: 'messages' ends with a user message after the last assistant message (expected the conversation to "
     "end with the assistant's reply)"),
    ("openmath null", "openmath", "om.jsonl",
     jsonl_bytes({"problem": "1+1?", "generated_solution": "2", "expected_answer": None}),
     " row 1: 'expected_answer' is null (expected a non-empty string)"),
    ("squad no answers", "squad", "sq.jsonl", jsonl_bytes({"context": "c", "question": "q", "answers": {"text": []}}),
     " row 1: 'answers' has 'text' that is an empty list (expected an object {\"text\": [answer, ...]})"),
    ("bad JSON line", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, GOOD_PC, b'{"prompt": "Q" "completion": "A"}'),
     " line 3 is not valid JSON: Expecting ',' delimiter (column 16)"),
    ("bad JSON after a blank line", "text", "data.jsonl", b'{"text": "a"}\n\n{"text": }\n',
     " line 3 is not valid JSON: Expecting value (column 10)"),
    ("non-UTF-8", "prompt_completion", "data.jsonl", jsonl_bytes(GOOD_PC, b'{"prompt": "caf\xe9", "completion": "x"}'),
     " line 2 is not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"),
    ("empty file", "prompt_completion", "data.jsonl", b"", " has no rows (the file is empty)"),
    ("blank lines only", "text", "data.jsonl", b"\n\n  \n", " has no rows"),
    ("empty JSON array", "text", "data.json", b"[]", " has no rows"),
    ("csv header only", "text", "data.csv", b"text\n", " has no rows"),
    ("csv empty cell", "prompt_completion", "data.csv", b"prompt,completion\nQ,A\nQ2,\n",
     " row 2: 'completion' is empty (expected a non-empty string)"),
    ("csv short row", "prompt_completion", "data.csv", b"prompt,completion\nQ,A\nQ2\n",
     " row 2 (line 3) has 1 fields, the header has 2 (prompt, completion)"),
    ("csv missing column", "prompt_completion", "data.csv", b"prompt,answer\nQ,A\n",
     " row 1: 'completion' is missing (the prompt_completion format needs prompt, completion)"),
    ("json array null", "text", "data.json", b'[{"text": "a"}, {"text": null}]',
     " row 2: 'text' is null (expected a non-empty string)"),
    ("json array malformed", "text", "data.json", b'[{"text": "a"},\n {"text": }]',
     " line 2 is not valid JSON: Expecting value (column 11)"),
    ("json non-UTF-8", "text", "data.json", b'[{"text": "a"},\n {"text": "\xff"}]',
     " line 2 is not valid UTF-8 (byte 0xff); save the file as UTF-8"),
    ("not parquet", "text", "data.parquet", b"this is not parquet", " is not a readable parquet file: "),
]


@pytest.mark.parametrize("case, choice, name, content, expected", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_rows_fail_with_one_line_naming_file_row_column(tmp_path, chat_tokenizer, case, choice, name, content,
                                                                  expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_training_data(config(choice, path, eval_samples=0), chat_tokenizer)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}{expected}"), message


def test_parquet_null_names_the_row(tmp_path, chat_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["a b", "c", None]}), path)
    with pytest.raises(UserError, match=r"data\.parquet row 3: 'text' is null \(expected a non-empty string\)$"):
        load_training_data(config("text", path, eval_samples=0), chat_tokenizer)


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: (tmp / "x.jsonl").mkdir() or tmp / "x.jsonl", "x.jsonl is a directory, not a data file; give a "
                                                                ".jsonl, .json, .parquet, .csv file or a hub dataset id"),
    (lambda tmp: tmp / "missing.jsonl", "missing.jsonl does not exist"),
    (lambda tmp: (tmp / "data.txt").write_text("x") and tmp / "data.txt",
     "data.txt has an unsupported extension; allowed: .jsonl, .json, .parquet, .csv"),
    (lambda tmp: tmp / "no such dir" / "data", "data does not exist and is not a hub dataset id (owner/name)"),
    (lambda tmp: tmp / "rows.txt", "rows.txt has an unsupported extension; allowed: .jsonl, .json, .parquet, .csv"),
])
def test_bad_paths_say_what_they_are(tmp_path, chat_tokenizer, make, expected):
    path = make(tmp_path)
    with pytest.raises(UserError) as err:
        load_training_data(config("text", path), chat_tokenizer)
    assert str(err.value).startswith("DATASET_PATH ") and str(err.value).endswith(expected), str(err.value)


def test_generic_formats_need_a_path():
    for choice in ("messages", "prompt_completion", "text"):
        with pytest.raises(UserError, match=f"^DATASET_CHOICE={choice} needs DATASET_PATH: a .jsonl/.json/.parquet/.csv "
                                            "file or a hub dataset id$"):
            resolve_source(choice, None)
    assert resolve_source("openmath", None).location == "nvidia/OpenMathInstruct-2"
    assert resolve_source("text", "HuggingFaceFW/fineweb-edu").kind == "hub"


def test_validate_config_accepts_the_formats_and_requires_their_path():
    from qlora.config import training_defaults

    defaults = training_defaults()
    for choice in ("openmath", "squad", "messages", "prompt_completion", "text"):
        validate_config({**defaults, "DATASET_CHOICE": choice, "DATASET_PATH": "data.jsonl"})
    with pytest.raises(ConfigError, match="^DATASET_CHOICE=messages needs DATASET_PATH"):
        validate_config({**defaults, "DATASET_CHOICE": "messages", "DATASET_PATH": None})
    with pytest.raises(ConfigError, match="allowed: openmath, squad, messages, prompt_completion, text"):
        validate_config({**defaults, "DATASET_CHOICE": "chat"})


def test_the_data_path_is_checked_with_the_config_before_anything_loads(tmp_path):
    from qlora.config import resolve_config, training_defaults

    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(UserError, match=r"x\.jsonl is a directory, not a data file"):
        resolve_config(training_defaults(), ["--DATASET_CHOICE=text", f"--DATASET_PATH={tmp_path / 'x.jsonl'}"])


@pytest.mark.parametrize("choice, path, word", [
    ("openmath", None, "openmath"),
    ("squad", "samples/squad_sample.jsonl", "squad"),
    ("messages", "/data/my_chats.v2.jsonl", "my-chats.v2"),
    ("prompt_completion", "pairs (final).csv", "pairs-final"),
    ("text", "HuggingFaceH4/ultrachat_200k", "ultrachat-200k"),
    ("text", "___.jsonl", "text"),
])
def test_dataset_tag_is_one_word_of_letters_digits_dots_dashes(choice, path, word):
    assert dataset_tag(choice, path) == word


def test_messages_train_on_the_last_assistant_turn_with_history_as_prompt(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT, "id": 7}] * 3)
    data = load_training_data(config("messages", path, eval_samples=1), chat_tokenizer)
    assert (len(data.train), len(data.held_out), data.trained_as, data.dataset_word) == (2, 1, "prompt_completion", "chats")
    assert data.train[0] == {"prompt": CHAT[:-1], "completion": CHAT[-1:]}
    assert data.sft_options == {"assistant_only_loss": False}
    assert data.metadata()["path"] == str(path.resolve()) and data.metadata()["format"] == "prompt_completion"


def test_messages_stay_whole_when_the_template_marks_assistant_output(tmp_path):
    from trl.chat_template_utils import has_generation_markers

    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    assert has_generation_markers(template)
    tokenizer = train_bpe_tokenizer(["Hello, be brief. What is 2 + 3? 5"] * 20, 300, chat_template=template)
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 3)
    data = load_training_data(config("messages", path, eval_samples=0), tokenizer)
    assert data.train[0] == {"messages": CHAT} and data.sft_options == {"assistant_only_loss": True}


def test_prompt_completion_becomes_one_turn(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PC] * 4)
    data = load_training_data(config("prompt_completion", path, eval_samples=1), chat_tokenizer)
    assert data.train[0] == {"prompt": [{"role": "user", "content": GOOD_PC["prompt"]}],
                             "completion": [{"role": "assistant", "content": GOOD_PC["completion"]}]}


def test_text_rows_stay_text(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "The sky is blue.", "source": 3}] * 3)
    data = load_training_data(config("text", path, eval_samples=0), chat_tokenizer)
    assert data.train.column_names == ["text"] and data.trained_as == "text" and data.train[0]["text"] == "The sky is blue."


def test_every_file_format_gives_the_same_rows(tmp_path, chat_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}, with a comma"} for i in range(5)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    loaded = {ext: load_rows("prompt_completion", str(tmp_path / f"d.{ext}"), 100).to_list()
              for ext in ("jsonl", "json", "csv", "parquet")}
    assert all(value == rows for value in loaded.values()), loaded


def test_rows_read_stop_at_max_rows(tmp_path, chat_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes(*[GOOD_PC] * 5, {"prompt": None}))  # the bad row is past the rows used
    data = load_training_data(config("prompt_completion", path, max_train_samples=3, eval_samples=2), chat_tokenizer)
    assert len(data.train) + len(data.held_out) == 5


def test_long_rows_are_cut_and_counted(tmp_path, chat_tokenizer):
    limit = MAX_CHARS_PER_TOKEN * 16
    rows = [GOOD_PC, {"prompt": "p" * (limit - 10), "completion": "c" * 50}, {"prompt": "q", "completion": "x" * 5 * limit}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    data = load_training_data(config("prompt_completion", path, eval_samples=0, max_seq_length=16), chat_tokenizer)
    assert data.cut_rows == 2 and data.metadata()["cut_rows"] == 2
    by_prompt = {row["prompt"][0]["content"][:1]: row for row in data.train}
    assert by_prompt["p"]["completion"][0]["content"] == "c" * 10  # the row's strings total `limit` characters
    assert by_prompt["q"]["completion"][0]["content"] == "x" * (limit - 1)
    assert by_prompt["W"]["completion"][0]["content"] == "5"


def test_cut_example_keeps_the_start_in_rendering_order():
    example = {"prompt": [{"role": "user", "content": "abcd"}], "completion": [{"role": "assistant", "content": "efgh"}]}
    assert cut_example(example, 6) == ({"prompt": [{"role": "user", "content": "abcd"}],
                                        "completion": [{"role": "assistant", "content": "ef"}]}, True)
    assert cut_example(example, 8) == (example, False)


def test_a_template_that_refuses_a_conversation_fails_before_training(tmp_path):
    gemma2_like = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                   "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}")
    tokenizer = train_bpe_tokenizer(["Hello, be brief."] * 20, 300, chat_template=gemma2_like)
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT[1:]}, {"messages": CHAT}])
    with pytest.raises(UserError, match=r"chats\.jsonl row 2: the chat template of tiny refuses its roles system -> "
                                        r"user -> assistant -> user -> assistant: System role not supported$"):
        load_training_data(config("messages", path, eval_samples=0), tokenizer)


def test_eval_samples_must_leave_training_rows(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PC] * 2)
    with pytest.raises(UserError, match="^eval_samples=2 leaves no training rows out of 2$"):
        load_training_data(config("prompt_completion", path, eval_samples=2), chat_tokenizer)


def test_shipped_samples_load_in_their_schema(chat_tokenizer):
    from conftest import OPENMATH_SAMPLE, SQUAD_SAMPLE

    for choice, path in (("openmath", OPENMATH_SAMPLE), ("squad", SQUAD_SAMPLE)):
        data = load_training_data(config(choice, path, max_train_samples=398), chat_tokenizer)
        assert (len(data.train), len(data.held_out), data.dataset_word, data.cut_rows) == (398, 2, choice, 0)


def test_a_utf8_byte_order_mark_is_read_as_text(tmp_path, chat_tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(GOOD_PC, GOOD_PC))
    assert load_rows("prompt_completion", str(path), 10).to_list() == [GOOD_PC, GOOD_PC]


def test_an_unreachable_hub_dataset_is_one_line():
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = ("from qlora.data.formats import load_rows\n"
            "try:\n    load_rows('text', 'nobody/nothing', 5)\nexcept Exception as err:\n"
            "    print(type(err).__name__, err)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip().startswith("UserError nobody/nothing cannot be read from the Hugging Face Hub: "), \
        result.stdout + result.stderr[-2000:]
    assert result.stdout.strip().count("\n") == 0
