"""Talking to a model (tools/chat.py): any output directory of this project (merged, adapter-only on its 4-bit
base, a PTQ sibling) or a plain Hugging Face model directory, prompted with the chat template saved with it
(the plain prompt format for a base model without one, as training would render it) and stopped by the rule
the generation check vouched for: the tokenizer's and the generation config's end-of-sequence ids.
Greedy by default, as the generation check and tools/evaluate.py decode."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qlora.checks.generation import eos_token_ids, prompt_ids, until_eos
from qlora.core.errors import UserError
from qlora.data.chat_format import ensure_chat_template
from qlora.evaluation import detect_load_kind, load_for_eval
from qlora.outputs.read import read_metadata


@dataclass(frozen=True)
class ChatOptions:
    """How each reply is generated (tools/chat.py's flags, with their defaults)."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy, the decoding the generation check vouched for
    top_p: float = 1.0
    seed: int = 0  # seeds sampling (temperature > 0); greedy ignores it
    system: str | None = None


def check_chat_options(options: ChatOptions) -> None:
    """One UserError line for a generation option out of range, before any model loads."""
    if options.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={options.max_new_tokens}: give a positive number of tokens")
    if not options.temperature >= 0:
        raise UserError(f"--temperature={options.temperature}: give 0 (greedy) or a positive temperature")
    if not 0 < options.top_p <= 1:
        raise UserError(f"--top-p={options.top_p}: give a value in (0, 1]")


def check_chat_dir(path: Path) -> str:
    """What `path` holds, checked before any model loads (one UserError line otherwise): "merged", "adapter",
    "ptq" or "base"."""
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: give an output directory of Fine-tuning/01_Train.py or "
                        "tools/quantize.py, or a Hugging Face model directory")
    try:
        return detect_load_kind(path, read_metadata(path)).kind
    except ValueError as err:  # detection's own one-line refusals
        raise UserError(str(err)) from None


def load_chat_model(path: Path, device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, template) for any directory tools/chat.py accepts; template is "model" (saved with the
    directory) or "plain" (none saved: the plain prompt format a training run on this model would use)."""
    model, tokenizer, _ = load_for_eval(path, device, trust_remote_code)
    return model, tokenizer, ensure_chat_template(tokenizer, str(path))


def _streamer(tokenizer, on_text: Callable[[str], None]):
    """A transformers TextStreamer (whole words, no prompt, no special tokens) handing each piece of decoded
    text to `on_text` instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class Conversation:
    """A chat's messages so far (the system prompt first, when there is one) and how replies are made."""

    model: object
    tokenizer: object
    options: ChatOptions = ChatOptions()
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.options.system}] if self.options.system else []

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> dict:
        """The model's reply to `text` after the conversation so far; both join the conversation. Returns
        {"answer", "new_tokens", "stopped"} (stopped: it ended with an end-of-sequence id, not at max_new_tokens).
        A reply interrupted (Ctrl-C) leaves the conversation as it was."""
        reply = generate_reply(self.model, self.tokenizer, self.messages + [{"role": "user", "content": text}],
                               self.options, on_text)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply["answer"]}]
        return reply


def _context_length(model) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def generate_reply(model, tokenizer, messages: list[dict[str, str]], options: ChatOptions,
                   on_text: Callable[[str], None] | None = None) -> dict:
    """One reply to `messages`, rendered by the tokenizer's chat template with the generation prompt (as the
    generation check renders held-out prompts), generated until an end-of-sequence id of `eos_token_ids` or
    `options.max_new_tokens`; the text is streamed to `on_text` as it is decoded."""
    import torch

    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:
        raise UserError("the tokenizer and the generation config name no end-of-sequence token: a reply cannot end")
    ids = prompt_ids(tokenizer, messages)
    context = _context_length(model)
    if context is not None and len(ids) + options.max_new_tokens > context:
        raise UserError(f"the conversation is {len(ids)} tokens; with --max-new-tokens={options.max_new_tokens} it "
                        f"exceeds the model's context of {context}: /reset it or ask for fewer new tokens")
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
                if options.temperature > 0 else {"do_sample": False})  # greedy: the generation check's arguments
    if options.temperature > 0:
        torch.manual_seed(options.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    streamer = _streamer(tokenizer, on_text) if on_text is not None else None
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             max_new_tokens=options.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                             streamer=streamer, **sampling)
    tokens, stopped = until_eos(out[0, len(ids):].tolist(), set(eos_ids))
    return {"answer": tokenizer.decode(tokens, skip_special_tokens=True), "new_tokens": len(tokens), "stopped": stopped}


def answer_prompts(conversation_for: Callable[[], Conversation], prompts: list[str], as_json: bool,
                   write: Callable[[str], None] | None = None) -> list[dict]:
    """One-shot mode: each prompt in a fresh conversation (the system prompt only). Plain output is the answers,
    a blank line after each; --json is one JSON object per line: {"prompt", "answer", "new_tokens", "stopped"}."""
    write = write or _stdout
    replies = []
    for prompt in prompts:
        reply = {"prompt": prompt, **conversation_for().ask(prompt)}
        write(json.dumps(reply, ensure_ascii=False) + "\n" if as_json else reply["answer"] + "\n\n")
        if not as_json and not reply["stopped"]:  # said apart from the answers, which stdout carries alone
            print(f"(the answer to prompt {len(replies) + 1} stopped at max_new_tokens before an end-of-sequence "
                  "token)", file=sys.stderr, flush=True)
        replies.append(reply)
    return replies


CHAT_HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply"
USER_PROMPT = "you> "
MODEL_PROMPT = "model> "


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # streamed text shows as it comes, also through a pipe


def chat_loop(conversation: Conversation, read: Callable[[], str] = input,
              write: Callable[[str], None] | None = None) -> None:
    """Interactive multi-turn chat: each line typed is a user turn, the reply is streamed as it is generated. The
    prompt is written here, not by input(), which writes it to stderr on a terminal."""
    out = write or _stdout

    out(f"{CHAT_HELP}\n")
    while True:
        out(USER_PROMPT)
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            out("\n")
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            conversation.reset()
            out("(conversation cleared)\n")
            continue
        if not command:
            continue
        out(MODEL_PROMPT)
        try:
            reply = conversation.ask(line, on_text=out)
        except KeyboardInterrupt:
            out("\n(reply stopped; it is not part of the conversation)\n")
            continue
        except UserError as err:
            out(f"\nerror: {err}\n")
            continue
        out("\n" if reply["stopped"] else
            f"\n(stopped at --max-new-tokens={conversation.options.max_new_tokens} before an end-of-sequence token)\n")


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """The one-shot prompts: each --prompt, then each non-empty line of --prompts-file ("-": standard input)."""
    lines: list[str] = []
    if prompts_file is not None:
        if prompts_file == "-":
            text = sys.stdin.read()
        else:
            path = Path(prompts_file)
            if not path.is_file():
                raise UserError(f"--prompts-file {path} is not a file: give a text file with one prompt per line")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"--prompts-file {path} is not UTF-8 text") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--prompts-file {prompts_file} has no prompt: write one prompt per line")
    return [*prompts, *lines]
