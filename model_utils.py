"""Model loading and LoRA targeting shared by the training script and the tools.

Also builds small Qwen3-architecture models with a BPE tokenizer (trained with `tokenizers`) and a
chat template, for tests and the demo: machines without hub access still run the real pipeline.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(model_name: str, quantization_config=None, device: str | None = None,
                   trust_remote_code: bool = False, dtype=None, for_fsdp: bool = False):
    """A causal LM from the hub or a local dir; 4-bit when `quantization_config` is given.

    Safetensors only: pickle checkpoints can run code on load, so they are refused. `for_fsdp` leaves
    placement to FSDP (no device_map), which shards the model onto the GPUs when training starts.
    Quantizing on load reads the checkpoint with pread instead of mmap (see `load_quantizing_with_pread`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from memory_utils import freed_blocks_leave_the_heap

    device = device or pick_device()
    # quantization_config=None passed explicitly would override a pre-quantized checkpoint's own config
    quantization = {} if quantization_config is None else {"quantization_config": quantization_config}
    options = dict(dtype=dtype or torch.bfloat16, device_map=None if for_fsdp else {"": device},
                   trust_remote_code=trust_remote_code, **quantization)
    files = [] if quantization_config is None or for_fsdp or trust_remote_code else safetensors_files(model_name)
    with freed_blocks_leave_the_heap():  # the bf16 buffers freed while quantizing would otherwise stay resident
        if files:
            model = load_quantizing_with_pread(model_name, files, options)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_name, use_safetensors=True, **options)
    share_nested_quant_maps(model)
    return model


def safetensors_files(model_name: str) -> list[str]:
    """Local paths of a checkpoint's safetensors shards, downloaded from the hub for a repo id; [] if none."""
    import json

    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    index = find("model.safetensors.index.json")
    if index:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        paths = [find(shard) for shard in shards]
        return paths if all(paths) else []
    single = find("model.safetensors")
    return [single] if single else []


def load_quantizing_with_pread(model_name: str, files: list[str], options: dict):
    """from_pretrained fed with tensors read by pread(2), one at a time as the quantizer asks for them.

    from_pretrained memory-maps the checkpoint: every page it reads for quantization stays in the process
    (RSS) until the map is closed, and the bf16 embedding, kept as a view of the map, keeps it open for
    the whole run. On Qwen3-0.6B that was 0.92 GiB of a 1.47 GiB RSS after an NF4 load on CPU; read
    with pread (and with `memory_utils.freed_blocks_leave_the_heap`) the load peaked at 0.99 GiB. A
    checkpoint that is already quantized, or one with its own code, goes through plain from_pretrained.
    """
    from contextlib import ExitStack

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name)
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is None or getattr(config, "quantization_config", None):
        return AutoModelForCausalLM.from_pretrained(model_name, use_safetensors=True, **options)
    with ExitStack() as stack:
        state_dict = {}
        for path in files:
            reader = stack.enter_context(safe_open(path, framework="pt", device="cpu", backend="pread"))
            state_dict.update({key: reader.get_slice(key) for key in reader.keys()})
        model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **options)
    # as from_pretrained(model_name) records it; peft writes it into the adapter config as the base model
    model.name_or_path = model.config._name_or_path = model_name
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_name)
    except OSError:  # no generation_config.json: from_pretrained keeps the one built from the config
        pass
    return model


def share_nested_quant_maps(model) -> int:
    """Point every 4-bit weight's double-quant lookup table at one tensor per device; returns bytes freed.

    bitsandbytes keeps a private copy of the same 256-entry fp32 map (1 KiB) in each weight's nested
    state; that is 0.004 bits per parameter on Qwen3-0.6B. Only identical tables are shared, and
    bitsandbytes clones the table when it serializes a state, so saving is unaffected.
    """
    import torch

    shared: dict = {}
    freed = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        state2 = getattr(state, "state2", None) if state is not None else None
        if state2 is None or state2.code is None:
            continue
        first = shared.setdefault(state2.code.device, state2.code)
        if first is not state2.code and torch.equal(first, state2.code):
            freed += state2.code.numel() * state2.code.element_size()
            state2.code = first
    return freed


def load_tokenizer(model_name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def target_modules_regex(patterns: Iterable[str]) -> str:
    """peft `target_modules` regex for names ('q_proj': any module ending so) and globs
    ('model.layers.*.self_attn.q_proj': full module names)."""
    parts = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?[.") :
            parts.append(fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(")\\Z"))
        else:
            parts.append(rf"(.*\.)?{re.escape(pattern)}")
    return "|".join(f"(?:{p})" for p in parts)


def linear_module_names(model) -> list[str]:
    """Full names of the Linear (incl. 4-bit / 8-bit) modules of a model, lm_head excluded."""
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]


def check_target_modules(model, patterns: Iterable[str]) -> list[str]:
    """Module names the patterns select; an error naming the modules that exist if a pattern matches none."""
    names = linear_module_names(model)
    selected = set()
    for pattern in patterns:
        regex = re.compile(target_modules_regex([pattern]))
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"target module {pattern!r} matches no Linear module; this model has: {', '.join(kinds)}")
        selected.update(hits)
    return sorted(selected)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with Qwen-style chat special tokens and template."""
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
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_qwen3_model(out_dir: str | Path, tokenizer, seed: int = 0, **config_overrides):
    """Save a randomly initialised Qwen3 causal LM (bf16, safetensors) and `tokenizer` into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    config = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config.update(config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


# metadata["quantization"]["extras"] key -> build_quantization_plan option: how the 4-bit base was loaded
BASE_LOAD_EXTRAS = {"double_quant": "double_quant", "base_quant_type": "quant_type",
                    "compute_dtype": "compute_dtype", "quant_storage": "quant_storage"}


def base_load_extras(metadata: dict) -> dict:
    """The extras of a run's quantization block that say how its 4-bit base was loaded."""
    extras = (metadata.get("quantization") or {}).get("extras") or {}
    return {key: value for key, value in extras.items() if key in BASE_LOAD_EXTRAS}


def plan_from_metadata(metadata: dict):
    """The `(spec, BitsAndBytesConfig | None)` a run used, rebuilt from its metadata's quantization block."""
    from quantization_utils import build_quantization_plan

    block = metadata["quantization"]
    extras = dict(block.get("extras") or {})
    options = {"lora_r": extras.get("lora_r"), "merge_after_train": extras.get("merge_after_train", True)}
    options.update({BASE_LOAD_EXTRAS[key]: value for key, value in base_load_extras(metadata).items()})
    return build_quantization_plan(block["method"], lm_head_dtype=block["lm_head_dtype"], **options)


def saved_lm_head(directory: str | Path):
    """lm_head.weight as saved in a model directory's safetensors (its own dtype), or None when tied."""
    from merge_utils import checkpoint_reader

    try:
        return checkpoint_reader(str(directory))("lm_head.weight")
    except KeyError:
        return None


def load_merged_dir(directory: str | Path, quantization_config=None, device: str | None = None,
                    trust_remote_code: bool = False):
    """A merged model directory, with its lm_head in the dtype it was saved in (fp16 stays fp16).

    `quantization_config` re-quantizes the 16-bit weights on load (the NF4 artifact is made this way);
    a directory saved re-quantized carries its own quantization config and needs none.
    """
    import torch

    from merge_utils import set_lm_head_dtype

    model = load_causal_lm(str(directory), quantization_config, device, trust_remote_code)
    head = saved_lm_head(directory)
    if head is not None and head.dtype != torch.bfloat16:
        set_lm_head_dtype(model, head.dtype, head)
    return model.eval()


def load_adapter_model(base_model: str, adapter_dir: str | Path, quantization_config=None, device: str | None = None,
                       trust_remote_code: bool = False):
    """The trained model: the adapter in `adapter_dir` on the base loaded by the same plan (4-bit for QLORA)."""
    from peft import PeftModel

    base = load_causal_lm(base_model, quantization_config, device, trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def load_output_dir(path: str | Path, device: str | None = None):
    """Load any output directory of 01_Train.py: `(model, tokenizer, metadata)`.

    Reads metadata.json and loads the primary artifact: the merged model (bf16, or NF4 with
    bitsandbytes), or the adapter on the 4-bit base rebuilt by the run's plan when the run is
    adapter-only or its merge check flagged the merge.
    """
    import json

    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} has no metadata.json: not an output directory of Fine-tuning/01_Train.py")
    metadata = json.loads(meta_file.read_text())
    artifact = metadata.get("artifact") or {}
    trust = bool((metadata.get("config") or {}).get("trust_remote_code", False))
    if artifact.get("primary", "merged") == "adapter" or artifact.get("kind") == "adapter_only":
        _, bnb_config = plan_from_metadata(metadata)
        model = load_adapter_model(metadata["base_model"], path / artifact.get("adapter_dir", "adapter"), bnb_config,
                                   device, trust)
    else:
        model = load_merged_dir(path, None, device, trust)
    return model, load_tokenizer(str(path), trust), metadata


# Qwen3 architectures by name (their published config.json), for building random-weight models locally.
QWEN3_ARCHITECTURES: dict[str, dict] = {
    "Qwen3-0.6B": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-4B": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-8B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def qwen3_architecture(name: str) -> dict:
    if name not in QWEN3_ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(QWEN3_ARCHITECTURES)}")
    return dict(QWEN3_ARCHITECTURES[name])


def prepare_kbit_model(model, gradient_checkpointing: bool, keep_embeddings_bf16: bool = True):
    """peft's `prepare_model_for_kbit_training`, minus its fp32 upcast of the frozen parameters.

    peft upcasts every non-4-bit parameter to fp32. For Qwen3-0.6B that is the 155.6M-parameter tied
    embedding/lm_head (0.31 GB in bf16 -> 0.62 GB in fp32), frozen, so it gains nothing from fp32; and
    the RMSNorm weights, which in fp32 turn the residual stream fp32: more activation memory, and a
    function that differs from the bf16 model the adapter is later served on (merged, or reloaded on
    the 4-bit base). With `keep_embeddings_bf16` (default) every frozen fp32 parameter goes back to
    bf16, as in TRL's own QLoRA recipe; False keeps peft's upcast (a benchmark lever).
    """
    import torch
    from peft import prepare_model_for_kbit_training

    from memory_utils import release_free_heap

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if keep_embeddings_bf16:
        for param in model.parameters():
            if param.dtype == torch.float32 and not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
        release_free_heap()  # the fp32 copies just dropped
    return model
