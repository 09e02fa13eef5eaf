"""Small models and tokenizers built locally, for tests, benchmarks and the demo: machines without hub
access still run the real pipeline. Real architectures' dimensions live in configs/models/*.json
(their published config.json), read by `architecture`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "configs" / "models"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A tiny model: seconds per QLoRA step on a CPU. Dimensions any decoder family accepts.
TINY_DIMENSIONS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)

def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on `texts`, with Qwen-style special tokens; `chat_template`
    None builds a base-model tokenizer (no template, like most pre-trained checkpoints)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast

def build_random_model(out_dir: str | Path, tokenizer, model_type: str = "qwen3", seed: int = 0, **config_overrides):
    """Save a randomly initialised causal LM of `model_type` (qwen3, llama, gemma3_text, ...; bf16,
    safetensors) and `tokenizer` into `out_dir`. Tiny unless `config_overrides` say otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from model_loading import save_tokenizer

    config = dict(TINY_DIMENSIONS, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config.update(config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    return model

def known_architectures() -> list[str]:
    return sorted(path.stem for path in MODEL_CONFIGS_DIR.glob("*.json"))

def architecture(name: str) -> dict:
    """A shipped architecture's config.json (configs/models/NAME.json) as a dict."""
    path = MODEL_CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(known_architectures())}")
    return json.loads(path.read_text())

def architecture_dimensions(name: str) -> dict:
    """The part of `architecture(name)` that sizes a model (for `build_random_model` overrides)."""
    config = architecture(name)
    return {key: value for key, value in config.items() if key not in ("architectures", "model_type", "torch_dtype",
                                                                        "bos_token_id", "eos_token_id")}
