"""What the model trains on, token for token, through TRL's SFTTrainer as the training script builds it: the
completion starts exactly where inference's generation starts, for chat templates (Qwen3-style with a think
block, Llama-3-style) and for base models trained on the plain prompt format saved with the output."""

import json

import pytest

from qlora.data.chat_format import ensure_chat_template, example_token_ids, plain_chat_template
from qlora.data.formats import load_training_data
from qlora.core.errors import UserError
from qlora.model.fixtures import SPECIAL_TOKENS, TINY_DIMENSIONS, base_tokenizer, train_bpe_tokenizer

# Modelled on Qwen3's published template (tool calls left out); the think-block logic is Qwen3's, verbatim.
QWEN3_STYLE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Llama 3's published template.
LLAMA3_STYLE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CORPUS = ["Ada has 3 apples and finds 4 more. How many apples does Ada have now? Ada has 7 apples. The answer is 7.",
          "You are a careful assistant. Let me add the numbers first. Hello, be brief. What is 2 + 3? It is 5."] * 30
SYSTEM = {"role": "system", "content": "You are a careful assistant."}
USER = {"role": "user", "content": "Ada has 3 apples and finds 4 more. How many apples does Ada have now?"}
ANSWER = {"role": "assistant", "content": "Ada has 7 apples. The answer is 7."}
CONVERSATIONS = {
    "one turn": [USER, ANSWER],
    "system prompt": [SYSTEM, USER, ANSWER],
    "history": [SYSTEM, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello, be brief."},
                USER, ANSWER],
    "reasoning": [USER, {"role": "assistant", "content": "<think>\nLet me add the numbers first.\n</think>\n\nIt is 7."}],
}
CFG = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "num_train_epochs": 1.0,
       "max_steps": 1, "max_seq_length": 512, "optim": "adamw_torch", "logging_steps": 1, "seed": 0,
       "gradient_checkpointing": False, "save_steps": 10, "keep_checkpoints": 1, "max_train_samples": 100,
       "eval_samples": 0, "packing": False, "MODEL_NAME": "tiny"}


def tokenizer_for(style: str):
    if style == "qwen3":
        return train_bpe_tokenizer(CORPUS, 400, chat_template=QWEN3_STYLE,
                                   special_tokens=SPECIAL_TOKENS + ["<think>", "</think>"])
    if style == "llama3":
        tokenizer = train_bpe_tokenizer(CORPUS, 400, chat_template=LLAMA3_STYLE, special_tokens=LLAMA3_TOKENS,
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None)
        tokenizer.pad_token = tokenizer.eos_token  # as qlora.model.loading.load_tokenizer does
        return tokenizer
    return base_tokenizer(CORPUS, 400, style)


def trained_sequences(tokenizer, data, tmp_path):
    """(input_ids, labels) of every training row, as the training script's SFTTrainer prepares them; the ids are
    also what chat_format.example_token_ids says they are."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.train.trainer import build_trainer

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", **dict(TINY_DIMENSIONS, vocab_size=len(tokenizer), num_hidden_layers=1)), dtype=torch.bfloat16)
    trainer = build_trainer(model, tokenizer, CFG, data.train, None, tmp_path / "checkpoints", "cpu", **data.sft_options)
    sequences = [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
    assert [ids for ids, _ in sequences] == [example_token_ids(tokenizer, example) for example in data.train]
    return sequences


def write_data(tmp_path, choice, rows):
    path = tmp_path / f"{choice}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {**CFG, "DATASET_CHOICE": choice, "DATASET_PATH": str(path)}


def first_trained(labels) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


def inference_prompt(tokenizer, prompt, **variables) -> list[int]:
    """The prompt tokens tools/evaluate.py (and any apply_chat_template user) feeds the model."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **variables)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", ["qwen3", "llama3"])
def test_chat_template_completion_starts_where_inference_generation_starts(tmp_path, style):
    tokenizer = tokenizer_for(style)
    template = tokenizer.chat_template
    assert ensure_chat_template(tokenizer) == "model" and tokenizer.chat_template == template  # its own, unchanged
    cfg = write_data(tmp_path, "messages", [{"messages": c} for c in CONVERSATIONS.values()])
    data = load_training_data(cfg, tokenizer)
    sequences = trained_sequences(tokenizer, data, tmp_path)
    assert len(sequences) == len(CONVERSATIONS)
    for name, (ids, labels), conversation in zip(CONVERSATIONS, sequences, CONVERSATIONS.values()):
        start = first_trained(labels)
        assert ids[:start] == inference_prompt(tokenizer, conversation[:-1]), name
        assert all(label == token for label, token in zip(labels[start:], ids[start:])), name  # the rest is trained
        trained = tokenizer.decode(ids[start:])
        if style == "llama3":
            assert trained == conversation[-1]["content"] + "<|eot_id|>", name
        elif name == "reasoning":
            assert trained == "<think>\nLet me add the numbers first.\n</think>\n\nIt is 7.<|im_end|>\n"
        else:  # data without reasoning: the empty think block is trained, the model learns to answer directly
            assert trained == f"<think>\n\n</think>\n\n{conversation[-1]['content']}<|im_end|>\n", name
            # enable_thinking=False writes that block into the prompt: the trained sequence continues from it
            non_thinking = inference_prompt(tokenizer, conversation[:-1], enable_thinking=False)
            assert ids[:len(non_thinking)] == non_thinking and len(non_thinking) > start, name


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_base_model_trains_on_the_plain_format_that_its_output_reproduces(tmp_path, style):
    from transformers import AutoTokenizer

    tokenizer = tokenizer_for(style)
    vocabulary = len(tokenizer)
    assert tokenizer.chat_template is None
    assert ensure_chat_template(tokenizer) == "plain" and len(tokenizer) == vocabulary  # no new tokens
    cfg = write_data(tmp_path, "messages", [{"messages": c} for c in CONVERSATIONS.values()])
    sequences = trained_sequences(tokenizer, load_training_data(cfg, tokenizer), tmp_path)
    tokenizer.save_pretrained(tmp_path / "output")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "output")
    assert reloaded.chat_template == plain_chat_template(with_bos=True)
    for name, (ids, labels), conversation in zip(CONVERSATIONS, sequences, CONVERSATIONS.values()):
        start = first_trained(labels)
        assert ids[:start] == inference_prompt(reloaded, conversation[:-1]), name
        assert ids[:start] == reloaded.apply_chat_template(conversation[:-1], add_generation_prompt=True,
                                                           return_dict=False), name
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id, name  # BOS once, first
        assert labels[-1] == ids[-1] == tokenizer.eos_token_id, name  # the model learns to stop
        assert tokenizer.decode(ids[start:]) == conversation[-1]["content"] + tokenizer.eos_token, name


def test_plain_format_reads_as_documented():
    tokenizer = tokenizer_for("llama")
    ensure_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATIONS["history"], tokenize=False)
    assert text == ("<s>You are a careful assistant.\n\n### User:\nHello\n\n### Assistant:\nHello, be brief.</s>\n\n"
                    f"### User:\n{USER['content']}\n\n### Assistant:\n{ANSWER['content']}</s>")
    assert tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True) == \
        f"<s>### User:\n{USER['content']}\n\n### Assistant:\n"


def test_plain_format_has_no_bos_when_the_tokenizer_adds_none():
    tokenizer = train_bpe_tokenizer(CORPUS, 400, chat_template=None)  # Qwen-style base tokenizer: no BOS
    assert ensure_chat_template(tokenizer) == "plain"
    assert tokenizer.chat_template == plain_chat_template(with_bos=False)
    assert tokenizer.apply_chat_template([USER], tokenize=False).startswith("### User:\n")


def test_prompt_completion_and_text_on_a_base_model(tmp_path):
    tokenizer = tokenizer_for("llama")
    ensure_chat_template(tokenizer)
    cfg = write_data(tmp_path, "prompt_completion", [{"prompt": USER["content"], "completion": ANSWER["content"]}])
    (ids, labels), = trained_sequences(tokenizer, load_training_data(cfg, tokenizer), tmp_path)
    start = first_trained(labels)
    assert ids[:start] == inference_prompt(tokenizer, [USER])
    assert tokenizer.decode(ids[start:]) == ANSWER["content"] + "</s>"

    cfg = write_data(tmp_path, "text", [{"text": ANSWER["content"]}])
    (ids, labels), = trained_sequences(tokenizer, load_training_data(cfg, tokenizer), tmp_path)
    assert labels == ids  # every token trained, despite completion_only_loss=True in the run's SFTConfig
    assert tokenizer.decode(ids) == "<s>" + ANSWER["content"] + "</s>"


def test_messages_with_generation_markers_train_every_assistant_turn(tmp_path):
    marked = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = train_bpe_tokenizer(CORPUS, 400, chat_template=marked)
    cfg = write_data(tmp_path, "messages", [{"messages": CONVERSATIONS["history"]}])
    (ids, labels), = trained_sequences(tokenizer, load_training_data(cfg, tokenizer), tmp_path)
    trained = tokenizer.decode([token for token, label in zip(ids, labels) if label != -100])
    assert trained == "Hello, be brief.<|im_end|>" + ANSWER["content"] + "<|im_end|>"


def test_no_template_and_no_eos_is_one_line_before_weights_load():
    tokenizer = train_bpe_tokenizer(CORPUS, 400, chat_template=None, eos_token=None)
    with pytest.raises(UserError, match="^the tokenizer of base-model has neither a chat template nor an EOS token: "
                                        "a completion needs an end token to be learned; use a tokenizer that "
                                        "defines eos_token$"):
        ensure_chat_template(tokenizer, "base-model")
