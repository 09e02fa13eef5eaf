"""How rows become the token sequences a model trains on, and the chat template that reproduces them at inference.

One rule for every chat format: the tokenizer's chat template renders the training rows, and the same template,
saved with the output, renders the prompts at inference, so the model is served exactly the context it was
trained on.

Chat models use their own template, unchanged, with its default variables. TRL 1.16's SFTTrainer tokenizes a
conversational prompt/completion row as `apply_chat_template(prompt, add_generation_prompt=True)` and
`apply_chat_template(prompt + completion)`, and trains on the tokens after their common prefix. It passes no
template variables of its own (only a row's `chat_template_kwargs` column, which our rows do not have).

Templates with a reasoning block (Qwen3): rows are rendered with the template's default, which for Qwen3 is
thinking mode (`enable_thinking` unset). The generation prompt then ends at `<|im_start|>assistant\n`, and the
final assistant turn renders as `<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>`; the reasoning is empty
unless the completion carries a `<think>...</think>` block. So the completion, the trained part, starts exactly
where `apply_chat_template(prompt, add_generation_prompt=True)` ends, and the empty think block is part of
it: on data without reasoning the model learns to answer without thinking. Inference reproduces the trained
sequence in both modes: by default the model writes the empty block itself, as trained; with
`enable_thinking=False` the template writes the same block into the prompt and the model continues with the
answer, the trained continuation. Training with `enable_thinking=False` instead would put the empty block in
the prompt, so a default (thinking-mode) prompt at inference would differ from training, and rows with real
reasoning would no longer share a prefix with their prompt.

Models without a chat template (most base checkpoints) get `plain_chat_template`: a plain prompt format
in words the base model already has, no new tokens (under QLoRA the embedding is frozen, so a new token
could not be learned). `ensure_chat_template` sets it on the tokenizer before training, so
`tokenizer.save_pretrained` writes it into the output and `apply_chat_template(messages,
add_generation_prompt=True)` on the output reproduces the training prompt. The plain format:

    {system message}                   (when there is one)

    ### User:
    {user message}

    ### Assistant:
    {assistant message}{EOS}

Blocks are separated by one blank line; the generation prompt is `### Assistant:\n` after a blank line; every
assistant message ends with the tokenizer's EOS token, so the model learns to stop. The tokenizer's BOS
token opens the text when the tokenizer adds one to plain text too (Llama, Gemma, Mistral), as in the
model's pre-training.
"""

from __future__ import annotations

from qlora.core.errors import UserError


PLAIN_ROLES = ("system", "user", "assistant")

_PLAIN_BODY = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('the plain prompt format has no role ' + message['role']"
    " + '; allowed: system, user, assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '\\n\\n### Assistant:\\n' if messages else '### Assistant:\\n' }}{% endif %}"
)


def plain_chat_template(with_bos: bool) -> str:
    """The plain prompt format as a Jinja chat template (see the module docstring)."""
    return ("{{- bos_token }}" if with_bos else "") + _PLAIN_BODY


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer opens plain text with its BOS token (Llama, Gemma), as the base model was trained."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer.chat_template)


def ensure_chat_template(tokenizer, model_name: str = "the model") -> str:
    """Give `tokenizer` a chat template if it has none; returns "model" (its own) or "plain" (ours).

    Call it right after loading the tokenizer, before any data is rendered and before weights load: a
    tokenizer without a template and without an EOS token cannot be trained to stop (UserError).
    """
    if has_chat_template(tokenizer):
        return "model"
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of {model_name} has neither a chat template nor an EOS token: a completion "
                        "needs an end token to be learned; use a tokenizer that defines eos_token")
    tokenizer.chat_template = plain_chat_template(adds_bos(tokenizer))
    return "plain"


def has_generation_markers(tokenizer) -> bool:
    """Whether the template marks assistant output with {% generation %}, which TRL's assistant_only_loss needs."""
    from trl.chat_template_utils import has_generation_markers as trl_has_markers

    return has_chat_template(tokenizer) and trl_has_markers(tokenizer.chat_template)


def conversation(example: dict) -> list[dict]:
    """The messages of a conversational trainer row: `messages`, or `prompt` + `completion`."""
    return example.get("messages") or example["prompt"] + example["completion"]


def example_token_ids(tokenizer, example: dict) -> list[int]:
    """A trainer row's token ids as TRL's SFTTrainer builds them, before truncation: a conversation through the
    chat template (which writes its own BOS), a text row through the tokenizer with EOS appended."""
    if "text" in example:
        text = example["text"]
        return tokenizer(text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token)["input_ids"]
    return tokenizer.apply_chat_template(conversation(example), tokenize=True, return_dict=False)


def check_template_renders(tokenizer, conversations, model_name: str = "the model") -> None:
    """Render one conversation per distinct sequence of roles with the tokenizer's template; a template that
    refuses one (Gemma 2's "System role not supported", roles that must alternate) is a UserError naming
    the row. `conversations` yields (row label, messages)."""
    from jinja2.exceptions import TemplateError

    seen = set()
    for label, messages in conversations:
        roles = tuple(message["role"] for message in messages)
        if roles in seen:
            continue
        seen.add(roles)
        try:
            tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError as err:
            raise UserError(f"{label}: the chat template of {model_name} refuses its roles "
                            f"{' -> '.join(roles)}: {err}") from None
