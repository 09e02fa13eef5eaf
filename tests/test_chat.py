"""tools/chat.py on outputs of the shipped demo model (trained weights: it answers in digits, not noise): one-shot
answers are what the generation check generates on the same prompts, for a merged and an adapter-only output;
the interactive loop, driven through a pseudo-terminal, streams replies and /reset clears the conversation; bad
input is one line before any model loads."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from conftest import FAST_TRAIN_ARGS, ROOT, train_on_openmath_sample
from qlora.chat import ChatOptions, Conversation, load_chat_model
from qlora.checks.generation import generation_check, new_token_budget
from qlora.evaluation import held_out_rows, training_split
from qlora.outputs.read import read_metadata
from tools.chat import main as chat

PROMPTS = 3
DEMO_MODEL = ROOT / "models" / "Qwen3-arith-1M"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"merged": dir, "adapter": dir}: a merged and an adapter-only run of the demo model on openmath rows."""
    out = tmp_path_factory.mktemp("chat_outputs")
    train_on_openmath_sample(DEMO_MODEL, out / "merged", *FAST_TRAIN_ARGS, "--lora_r=8")
    train_on_openmath_sample(DEMO_MODEL, out / "adapter", *FAST_TRAIN_ARGS, "--lora_r=8", "--merge_after_train=false")
    return {which: next((out / which).iterdir()) for which in ("merged", "adapter")}


@pytest.fixture(scope="module")
def merged_dir(runs):
    return runs["merged"]


def _held_out(directory):
    """The run's first held-out prompt/completion rows, split as its training split them."""
    _, examples = held_out_rows(training_split(read_metadata(directory)), PROMPTS)
    return examples


@pytest.mark.parametrize("which", ["merged", "adapter"])
def test_one_shot_answers_are_the_generation_checks(which, runs, capsys):
    """What --prompt prints is what the run's generation check decodes for the same prompts (greedy, the same
    template and stop rule), on each primary artifact kind."""
    directory = runs[which]
    assert read_metadata(directory)["artifact"]["primary"] == which
    examples = _held_out(directory)
    model, tokenizer, template = load_chat_model(directory, "cpu")
    assert template == "model"  # the template saved with the run, not a fallback
    budget = new_token_budget(tokenizer, [e["completion"] for e in examples])
    check = generation_check(model, tokenizer, examples, max_prompts=PROMPTS, batch_size=1)
    prompts = [e["prompt"][-1]["content"] for e in examples]
    replies = chat([str(directory), *(f"--prompt={p}" for p in prompts), "--json", f"--max-new-tokens={budget}",
                    "--device=cpu"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == replies and [r["prompt"] for r in replies] == prompts
    assert [r["answer"] for r in replies] == [s["output"] for s in check["samples"]]
    assert all(0 < r["new_tokens"] <= budget for r in replies)
    assert any(character.isdigit() for r in replies for character in r["answer"])  # trained weights: real answers


def test_the_conversation_keeps_turns_and_reset_clears_them(merged_dir):
    model, tokenizer, _ = load_chat_model(merged_dir, "cpu")
    conversation = Conversation(model, tokenizer, ChatOptions(max_new_tokens=8, system="Answer briefly."))
    first = conversation.ask("What is 2+3?")
    conversation.ask("And 4+4?")
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[2]["content"] == first["answer"]
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "Answer briefly."}]
    assert conversation.ask("What is 2+3?") == first  # a fresh conversation: the same greedy reply


def _read_until(fd, marker: bytes, seen: bytearray, timeout: float = 120) -> bytes:
    """Bytes from the pty until `marker` appears after what was already `seen`; returns the new part."""
    start = len(seen)
    deadline = time.monotonic() + timeout
    while marker not in seen[start:]:
        assert time.monotonic() < deadline, f"no {marker!r} in {bytes(seen[start:])!r}"
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return bytes(seen[start:])


def test_interactive_chat_through_a_terminal(merged_dir, capsys):
    """Typed lines in, streamed replies out; a reply after /reset is the first conversation's again (greedy, same
    context), and the second turn without it saw the first; /exit leaves with status 0."""
    chat([str(merged_dir), "--prompt=What is 2+3?", "--max-new-tokens=8", "--device=cpu"])
    expected = capsys.readouterr().out.strip()
    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, str(ROOT / "tools" / "chat.py"), str(merged_dir), "--max-new-tokens=8",
                              "--device=cpu"], stdin=terminal, stdout=terminal, stderr=subprocess.DEVNULL, cwd=ROOT,
                             close_fds=True)
    os.close(terminal)
    seen = bytearray()
    try:
        _read_until(controller, b"you> ", seen)
        os.write(controller, b"What is 2+3?\n")
        first = _read_until(controller, b"you> ", seen)
        os.write(controller, b"/reset\n")
        assert b"(conversation cleared)" in _read_until(controller, b"you> ", seen)
        os.write(controller, b"What is 2+3?\n")
        after_reset = _read_until(controller, b"you> ", seen)
        os.write(controller, b"/exit\n")
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        os.close(controller)

    def reply(echoed: bytes) -> str:  # the terminal echoes the typed line; the reply follows "model> "
        text = echoed.decode().replace("\r\n", "\n").split("model> ", 1)[1].rsplit("you> ", 1)[0]
        return text.split("\n(stopped at", 1)[0].strip()

    assert reply(first) == reply(after_reset) == expected


def test_bad_input_is_one_line_before_loading(tmp_path, capsys):
    model_dir = tmp_path / "model"  # passes the directory check; nothing loads before the prompts are read
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cases = [
        ([str(tmp_path / "missing")], "is not a directory"),
        ([str(tmp_path)], "neither an output directory"),
        ([str(tmp_path), "--max-new-tokens=0"], "--max-new-tokens=0"),
        ([str(tmp_path), "--top-p=1.5"], "--top-p=1.5"),
        ([str(tmp_path), "--temperature=-1"], "--temperature=-1"),
        ([str(model_dir), "--prompts-file", str(tmp_path / "none.txt")], "is not a file"),
        ([str(model_dir), "--json"], "--json is for one-shot answers"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            chat(argv)
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and words in message and "\n" not in message, (argv, message)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match="has no prompt"):
        chat([str(model_dir), "--prompts-file", str(tmp_path / "empty.txt")])
