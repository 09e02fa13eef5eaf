"""Small models and tokenizers built locally, for tests, benchmarks and the demo: machines without hub
access still run the real pipeline. Real architectures' dimensions live in configs/models/*.json
(their published config.json), read by `architecture`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from qlora.core.files import REPO_ROOT
from qlora.data.synthetic import generate_rows
from qlora.model.loading import SOURCE_KEY, save_tokenizer


MODEL_CONFIGS_DIR = REPO_ROOT / "configs" / "models"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A tiny model: seconds per QLoRA step on a CPU. Dimensions any decoder family accepts.
TINY_DIMENSIONS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)

# Special tokens of base-model tokenizer families (no chat template): BOS opens every encoded text, as in
# the real checkpoints; Llama's has no pad token (qlora.model.loading.load_tokenizer pads with EOS).
BASE_TOKENIZER_STYLES = {
    "llama": dict(special_tokens=["<unk>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", pad_token=None),
    "gemma": dict(special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], bos_token="<bos>", eos_token="<eos>",
                  pad_token="<pad>"),
}
# Architectures that scale attention by query_pre_attn_scalar (the published configs set it to head_dim).
_SCALED_BY_HEAD_DIM = ("gemma2", "gemma3_text")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str | None = CHAT_TEMPLATE,
                        special_tokens: list[str] = SPECIAL_TOKENS, bos_token: str | None = None,
                        eos_token: str = "<|im_end|>", pad_token: str | None = "<|endoftext|>"):
    """A byte-level BPE tokenizer trained on `texts`, with Qwen-style special tokens by default; `chat_template`
    None builds a base-model tokenizer (no template, like most pre-trained checkpoints). A `bos_token` is
    put in front of every encoded text, as Llama and Gemma tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if bos_token is not None:
        bos = (bos_token, tokenizer.token_to_id(bos_token))
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A",
                                                                 pair=f"{bos_token} $A {bos_token} $B", special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos_token, eos_token=eos_token,
                                   pad_token=pad_token)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def base_tokenizer(texts: Iterable[str], vocab_size: int, style: str):
    """A base-model tokenizer (no chat template) with the special tokens of `style`: llama | gemma."""
    if style not in BASE_TOKENIZER_STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; allowed: {', '.join(BASE_TOKENIZER_STYLES)}")
    return train_bpe_tokenizer(texts, vocab_size, chat_template=None, **BASE_TOKENIZER_STYLES[style])


def build_random_model(out_dir: str | Path, tokenizer, model_type: str = "qwen3", seed: int = 0, **config_overrides):
    """Save a randomly initialised causal LM of `model_type` (qwen3, llama, gemma3_text, gemma2, ...; bf16,
    safetensors) and `tokenizer` into `out_dir`. Tiny unless `config_overrides` say otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = dict(TINY_DIMENSIONS, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config.update(config_overrides)
    if model_type in _SCALED_BY_HEAD_DIM:
        config.setdefault("query_pre_attn_scalar", config["head_dim"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    return model

def known_architectures() -> list[str]:
    return sorted(path.stem for path in MODEL_CONFIGS_DIR.glob("*.json"))

def architecture(name: str) -> dict:
    """A shipped architecture's config.json (configs/models/NAME.json) as a dict, without the `_source` key
    that names the hub repo the file was copied from."""
    path = MODEL_CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(known_architectures())}")
    return without_source(json.loads(path.read_text()))

def without_source(config: dict) -> dict:

    return {key: value for key, value in config.items() if key != SOURCE_KEY}

def architecture_dimensions(name: str) -> dict:
    """The part of `architecture(name)` that sizes a model (for `build_random_model` overrides)."""
    return model_dimensions(architecture(name))

def model_dimensions(config: dict) -> dict:
    """`config` without what `build_random_model` sets itself (class, dtype, token ids); head_dim spelled out
    where the config leaves it to hidden_size / num_attention_heads (Llama, Mistral)."""
    dimensions = {key: value for key, value in config.items() if key not in (
        "architectures", "model_type", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id")}
    dimensions.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return dimensions


def tokenizer_corpus(rows_per_dataset: int = 400) -> list[str]:
    """Texts of the project's generated openmath and squad rows: what its small BPE tokenizers are trained on."""
    texts = []
    for row in generate_rows("openmath", rows_per_dataset):
        texts += [row["problem"], row["generated_solution"]]
    for row in generate_rows("squad", rows_per_dataset):
        texts += [row["context"], row["question"]]
    return texts


def build_tiny_model(out_dir: str | Path, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A tiny randomly initialised Qwen3 with a BPE tokenizer trained on `tokenizer_corpus`, saved into `out_dir`
    (tools/make_tiny_model.py, the tests' fixtures)."""
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), vocab_size)
    return build_random_model(out_dir, tokenizer, seed=seed, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=layers)
