"""Training data: the dataset registry, reading rows from a local file or the Hugging Face Hub, checking every
row, the held-out split, and the rows TRL's SFTTrainer trains on.

DATASET_CHOICE names one of:
- `openmath`, `squad`: registered datasets. Streamed from the Hub (only the rows used are downloaded), or
  read from DATASET_PATH in the same schema. Each row becomes a one-turn conversation.
- `messages`: rows with `messages`, a list of {role, content} (roles system, user, assistant) ending with
  the assistant's reply. The loss covers assistant tokens only. TRL's `assistant_only_loss` needs
  `{% generation %}` markers in the chat template, which almost no model ships: for a template without them
  each conversation becomes a prompt/completion row whose completion is its LAST assistant message, the
  earlier turns being prompt context (not trained on). A template with the markers trains on every
  assistant message. Keys other than role and content are not used.
- `prompt_completion`: rows with `prompt` and `completion` strings; the prompt becomes one user message,
  the completion the assistant's reply; the loss covers the completion.
- `text`: rows with `text`; trained as plain text, loss on every token, the tokenizer's EOS appended.
These three need DATASET_PATH: a local .jsonl/.json/.parquet/.csv file or a Hub dataset id (streamed).
Conversations are rendered by the model's chat template, or the plain prompt format for a model without
one (qlora/data/chat_format.py), which is saved with the output so inference renders prompts as training did.

Every row read is checked before any weights load: required columns present, strings non-empty, messages
well formed; the first bad row is one line naming the file, the row, the column and what was found.
The project's own sample files (`samples/`) are generated (qlora/data/synthetic.py), not copied from the real datasets.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from qlora.core.errors import UserError
from qlora.core.files import REPO_ROOT
from qlora.data.chat_format import check_template_renders, conversation, has_generation_markers


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SAMPLES_DIR = REPO_ROOT / "samples"
MESSAGE_ROLES = ("system", "user", "assistant")
NEEDS_PATH = f"needs DATASET_PATH: a {'/'.join(LOCAL_FORMATS)} file or a hub dataset id"
# A row's strings are cut to this many characters per token of max_seq_length before tokenization: no
# tokenizer averages 64 characters per token, so the cut never reaches what the model sees (TRL keeps the
# first max_seq_length tokens), and a huge row cannot stall tokenization.
MAX_CHARS_PER_TOKEN = 64
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# ----- checking values: each check returns (normalized value, None) or (None, what was found and expected) -----


def describe(value: Any) -> str:
    """What a bad value is, in words: 'is null', 'is an integer (3)', 'is whitespace only', ..."""
    if value is None:
        return "is null"
    if isinstance(value, bool):
        return f"is a boolean ({json.dumps(value)})"
    if isinstance(value, int):
        return f"is an integer ({value})"
    if isinstance(value, float):
        return f"is a number ({value})"
    if isinstance(value, str):
        return "is empty" if not value else "is whitespace only" if not value.strip() else f"is the string {value[:40]!r}"
    if isinstance(value, (list, tuple)):
        return "is an empty list" if not value else f"is a list of {len(value)}"
    if isinstance(value, dict):
        return "is an object"
    return f"is a {type(value).__name__}"


def check_text(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str) and value.strip():
        return value, None
    return None, f"{describe(value)} (expected a non-empty string)"


def check_messages(value: Any) -> tuple[Any, str | None]:
    """A conversation: a list of {role, content}, roles in MESSAGE_ROLES, ending with the assistant's reply."""
    if not isinstance(value, list) or not value:
        return None, f"{describe(value)} (expected a list of {{role, content}} messages)"
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return None, f"message {number} {describe(message)} (expected an object with role and content)"
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            found = "has no role" if "role" not in message else f"has role {role!r}"
            return None, f"message {number} {found} (expected one of {', '.join(MESSAGE_ROLES)})"
        content = message.get("content")
        if check_text(content)[1]:
            found = "has no content" if "content" not in message else f"content {describe(content)}"
            return None, f"message {number} ({role}) {found} (expected a non-empty string)"
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        return None, "has no assistant message (expected at least one, ending the conversation)"
    if messages[-1]["role"] != "assistant":
        return None, (f"ends with a {messages[-1]['role']} message after the last assistant message "
                      "(expected the conversation to end with the assistant's reply)")
    return messages, None


def check_answers(value: Any) -> tuple[Any, str | None]:
    """squad's answers: {"text": [answer, ...], ...}; csv files hold it as a JSON string."""
    expected = '(expected an object {"text": [answer, ...]})'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"is a string that is not JSON {expected}"
    if not isinstance(value, dict):
        return None, f"{describe(value)} {expected}"
    texts = value.get("text")
    if not isinstance(texts, list) or not texts:
        return None, f"has 'text' that {describe(texts)} {expected}"
    for number, text in enumerate(texts, 1):
        if check_text(text)[1]:
            return None, f"answer {number} {describe(text)} (expected a non-empty string)"
    return {"text": list(texts)}, None


def squad_answers(row: dict[str, Any]) -> list[str]:
    answers = row["answers"]
    if isinstance(answers, str):  # csv files hold the answers dict as a JSON string
        answers = json.loads(answers)
    return list(answers["text"])


# ----- the registry: a name -> the columns its rows need and the trainer example a row becomes ------------------


def _chat(prompt: str, completion: str) -> dict[str, Any]:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": completion}]}


def squad_prompt(context: str, question: str) -> str:
    return f"Answer the question with a span of the context.\n\nContext: {context}\n\nQuestion: {question}"


def _last_reply(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]  # checked: ends with an assistant message
    return {"prompt": messages[:-1], "completion": messages[-1:]}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    columns: Mapping[str, Callable[[Any], tuple[Any, str | None]]]  # column -> its check (and normalization)
    to_example: Callable[[dict[str, Any]], dict[str, Any]]  # checked row -> trainer example
    hub_id: str | None = None  # where a registered dataset lives; None: DATASET_PATH names the data
    hub_split: str = "train"
    reference_column: str | None = None  # what evaluation compares generations against; None: no score

    @property
    def needs_path(self) -> bool:
        return self.hub_id is None


DATASETS: dict[str, DatasetSpec] = {
    "openmath": DatasetSpec(
        "openmath", {"problem": check_text, "generated_solution": check_text, "expected_answer": check_text},
        lambda row: _chat(row["problem"], row["generated_solution"]), "nvidia/OpenMathInstruct-2",
        reference_column="expected_answer"),
    "squad": DatasetSpec(
        "squad", {"context": check_text, "question": check_text, "answers": check_answers},
        lambda row: _chat(squad_prompt(row["context"], row["question"]), squad_answers(row)[0]), "rajpurkar/squad",
        reference_column="answers"),
    "messages": DatasetSpec("messages", {"messages": check_messages}, _last_reply),
    "prompt_completion": DatasetSpec("prompt_completion", {"prompt": check_text, "completion": check_text},
                                     lambda row: _chat(row["prompt"], row["completion"])),
    "text": DatasetSpec("text", {"text": check_text}, lambda row: {"text": row["text"]}),
}


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def check_row(spec: DatasetSpec, row: Any, label: str) -> dict[str, Any]:
    """The row's columns checked and normalized, or a UserError naming the row, the column and what was found."""
    if not isinstance(row, dict):
        raise UserError(f"{label} {describe(row)}, not an object (expected the columns {', '.join(spec.columns)})")
    checked = {}
    for column, check in spec.columns.items():
        if column not in row:
            raise UserError(f"{label}: {column!r} is missing (the {spec.name} format needs {', '.join(spec.columns)})")
        checked[column], problem = check(row[column])
        if problem:
            raise UserError(f"{label}: {column!r} {problem}")
    return checked


# ----- where rows come from ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    kind: str  # "file" | "hub"
    location: str  # the path as given, or the hub id
    split: str = "train"

    @property
    def resolved(self) -> str:
        """What metadata records: the absolute path of a file, or the hub id."""
        return str(Path(self.location).resolve()) if self.kind == "file" else self.location


def resolve_source(choice: str, path: str | None) -> DataSource:
    """Where a dataset's rows come from: DATASET_PATH (a local file or a hub id), else the registry's hub id.
    Checks the path without reading it: a one-line UserError for a directory, a missing file, a bad extension."""
    spec = get_dataset_spec(choice)
    if path is None:
        if spec.needs_path:
            raise UserError(f"DATASET_CHOICE={choice} {NEEDS_PATH}")
        return DataSource("hub", spec.hub_id, spec.hub_split)
    file = Path(path)
    allowed = ", ".join(LOCAL_FORMATS)
    if file.is_dir():
        raise UserError(f"DATASET_PATH {path} is a directory, not a data file; give a {allowed} file or a hub dataset id")
    if file.suffix.lower() in LOCAL_FORMATS:
        if not file.exists():
            raise UserError(f"DATASET_PATH {path} does not exist")
        if not file.is_file():
            raise UserError(f"DATASET_PATH {path} is not a regular file")
        return DataSource("file", str(path))
    if file.exists():
        raise UserError(f"DATASET_PATH {path} has an unsupported extension; allowed: {allowed}")
    if not _HUB_ID.match(str(path)):
        if file.suffix:
            raise UserError(f"DATASET_PATH {path} has an unsupported extension; allowed: {allowed}")
        raise UserError(f"DATASET_PATH {path} does not exist and is not a hub dataset id (owner/name)")
    return DataSource("hub", str(path))


def dataset_tag(choice: str, path: str | None) -> str:
    """The dataset's word in output names: the registry name (openmath, squad), else the data file's stem or the
    hub id's last part, kept to letters, digits, '.' and '-' (names are read back as '_'-separated words)."""
    spec = get_dataset_spec(choice)
    if not spec.needs_path or path is None:
        return choice
    stem = Path(path).stem if Path(path).suffix.lower() in LOCAL_FORMATS else str(path).rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9.-]+", "-", stem).strip("-.") or choice


def _decoded_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, read line by line; a byte that is not UTF-8 names its line."""
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{file} line {number} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}); save the file as UTF-8") from None
            yield number, text


def _json_lines(file: Path) -> Iterator[tuple[str, Any]]:
    row = 0
    for number, text in _decoded_lines(file):
        if not text.strip():
            continue
        row += 1
        try:
            value = json.loads(text)
        except ValueError as err:
            raise UserError(f"{file} line {number} is not valid JSON: {err.msg} (column {err.colno})") from None
        yield (f"{file} row {row}" if row == number else f"{file} row {row} (line {number})"), value


def _json_rows(file: Path) -> Iterator[tuple[str, Any]]:
    """A .json file: one JSON array of rows, or one row per line (as `datasets` reads both)."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{file} line {line} is not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None
    if not text.lstrip().startswith("["):
        yield from _json_lines(file)
        return
    try:
        rows = json.loads(text)
    except ValueError as err:
        raise UserError(f"{file} line {err.lineno} is not valid JSON: {err.msg} (column {err.colno})") from None
    for number, row in enumerate(rows, 1):
        yield f"{file} row {number}", row


def _csv_rows(file: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(text for _, text in _decoded_lines(file))
    header = next(reader, None)
    if header is None:
        return
    number = 0
    for cells in reader:
        if not cells:  # a blank line
            continue
        number += 1
        if len(cells) != len(header):
            raise UserError(f"{file} row {number} (line {reader.line_num}) has {len(cells)} fields, the header has "
                            f"{len(header)} ({', '.join(header)})")
        yield f"{file} row {number}", dict(zip(header, cells))


def _parquet_rows(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{file} is not a readable parquet file: {_first_line(err)}") from None
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield f"{file} row {number}", row


def _hub_rows(source: DataSource) -> Iterator[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        stream = load_dataset(source.location, split=source.split, streaming=True)
        for number, row in enumerate(stream, 1):
            yield f"{source.location} row {number}", row
    except (OSError, ValueError) as err:
        raise UserError(f"{source.location} cannot be read from the Hugging Face Hub: {_first_line(err)}") from None


_FILE_READERS = {".jsonl": _json_lines, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_rows(spec: DatasetSpec, source: DataSource, max_rows: int) -> list[tuple[str, dict[str, Any]]]:
    """Up to `max_rows` (label, checked row) pairs; the first bad row, an unreadable file or an empty one is a
    UserError."""
    if source.kind == "file":
        file = Path(source.location)
        rows = _FILE_READERS[file.suffix.lower()](file)
    else:
        rows = _hub_rows(source)
    checked = [(label, check_row(spec, row, label)) for label, row in islice(rows, max_rows)]
    if not checked:
        empty = source.kind == "file" and Path(source.location).stat().st_size == 0
        raise UserError(f"{source.location} has no rows" + (" (the file is empty)" if empty else ""))
    return checked


def load_rows(name: str, path: str | None, max_rows: int):
    """Up to `max_rows` checked rows of dataset `name` (its columns only, normalized) as a `datasets.Dataset`,
    from DATASET_PATH or the registry's hub dataset."""
    from datasets import Dataset

    spec = get_dataset_spec(name)
    return Dataset.from_list([row for _, row in read_rows(spec, resolve_source(name, path), max_rows)])


def split_rows(rows, eval_rows: int, seed: int):
    """Deterministic train / held-out split; the same (row count, eval_rows, seed) always gives the same split."""
    if eval_rows <= 0:
        return rows, rows.select([])
    if eval_rows >= len(rows):
        raise UserError(f"eval_samples={eval_rows} leaves no training rows out of {len(rows)}")
    parts = rows.train_test_split(test_size=eval_rows, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def to_sft_dataset(rows, name: str):
    """Checked rows -> the rows TRL trains on: conversational prompt/completion (TRL computes the loss on the
    completion only), or `text` for the text format."""
    spec = get_dataset_spec(name)
    return rows.map(spec.to_example, remove_columns=rows.column_names)


# ----- one call for the training script -----------------------------------------------------------------------------


def cut_example(example: dict[str, Any], max_chars: int) -> tuple[dict[str, Any], bool]:
    """The example with its strings, in rendering order, cut to `max_chars` characters in all; and whether any was."""
    budget, cut = max_chars, False

    def keep(text: str) -> str:
        nonlocal budget, cut
        kept = text[:max(budget, 0)]
        budget -= len(text)
        cut = cut or len(kept) < len(text)
        return kept

    return {key: keep(value) if isinstance(value, str) else [{**m, "content": keep(m["content"])} for m in value]
            for key, value in example.items()}, cut


@dataclass(frozen=True)
class TrainingData:
    """What the training script trains and evaluates on, and what metadata.json says about it."""

    train: Any  # datasets.Dataset of trainer rows
    held_out: Any  # held-out rows, same form (empty when eval_samples is 0)
    dataset_word: str  # the dataset's word in the output name
    cut_rows: int  # rows whose strings were cut to max_row_chars
    source: str  # absolute path of the data file, or the hub id
    choice: str  # DATASET_CHOICE
    path: str | None  # DATASET_PATH as resolved (absolute file path or hub id); None: the registry's hub dataset
    trained_as: str  # the rows TRL gets: prompt_completion | messages | text
    max_row_chars: int
    split_seed: int

    @property
    def sft_options(self) -> dict[str, Any]:
        """SFTConfig options the rows need: assistant-only loss for conversations kept whole."""
        return {"assistant_only_loss": self.trained_as == "messages"}

    def describe(self) -> str:
        """The data step's log line."""
        return (f"{self.choice}: {len(self.train)} train / {len(self.held_out)} held-out rows from {self.source} as "
                f"{self.trained_as}; {self.cut_rows} rows cut to {self.max_row_chars} characters")

    def metadata(self) -> dict[str, Any]:
        return {"name": self.choice, "format": self.trained_as, "path": self.path, "source": self.source,
                "word": self.dataset_word, "train_rows": len(self.train), "eval_rows": len(self.held_out),
                "split_seed": self.split_seed, "cut_rows": self.cut_rows, "max_row_chars": self.max_row_chars}


def load_training_data(cfg: Mapping[str, Any], tokenizer) -> TrainingData:
    """Read, check, convert, cut and split the run's data; every failure is a one-line UserError, raised before
    any weights load. `tokenizer` carries the chat template the rows are rendered with (after
    chat_format.ensure_chat_template): one conversation per distinct sequence of roles is rendered here, so a
    template that refuses a row fails now, not inside the trainer."""
    from datasets import Dataset

    choice = cfg["DATASET_CHOICE"]
    spec = get_dataset_spec(choice)
    source = resolve_source(choice, cfg["DATASET_PATH"])
    rows = read_rows(spec, source, cfg["max_train_samples"] + cfg["eval_samples"])
    whole_conversations = choice == "messages" and has_generation_markers(tokenizer)
    examples = [(label, row if whole_conversations else spec.to_example(row)) for label, row in rows]
    if choice != "text":
        check_template_renders(tokenizer, ((label, conversation(example)) for label, example in examples),
                               cfg["MODEL_NAME"])
    max_chars = MAX_CHARS_PER_TOKEN * cfg["max_seq_length"]
    cut = [cut_example(example, max_chars) for _, example in examples]
    train, held_out = split_rows(Dataset.from_list([example for example, _ in cut]), cfg["eval_samples"], cfg["seed"])
    return TrainingData(
        train=train, held_out=held_out, dataset_word=dataset_tag(choice, cfg["DATASET_PATH"]),
        cut_rows=sum(was_cut for _, was_cut in cut), source=source.resolved, choice=choice,
        path=source.resolved if cfg["DATASET_PATH"] is not None else None,
        trained_as="messages" if whole_conversations else "text" if choice == "text" else "prompt_completion",
        max_row_chars=max_chars, split_seed=cfg["seed"])
