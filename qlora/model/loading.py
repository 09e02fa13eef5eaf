"""Loading a base model and its tokenizer, from the hub or a local directory, 16-bit or quantized on load,
and preparing a 4-bit model for k-bit training. Shared by the training script and every tool."""

from __future__ import annotations

from pathlib import Path

from qlora.core.errors import ConfigError, UserError
from qlora.core.heap import freed_blocks_leave_the_heap
from qlora.core.logs import step
from qlora.core.memory import available_memory, describe_footprint, format_size, weight_footprint
from qlora.model.checkpoint import checkpoint_reader


def read_model_config(model_name: str, max_seq_length: int, trust_remote_code: bool = False) -> dict:
    """The model's (text) config as a dict, from config.json alone (hub id, local dir or a config.json file;
    no weights), after checking that the sequence length fits the model's context. Bad input is one
    ConfigError line."""
    from transformers import AutoConfig

    quiet_bitsandbytes_notices()
    try:
        model_config = AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"MODEL_NAME={model_name!r} cannot be loaded: {first_line}") from None
    check_safetensors_weights(model_name)
    text_config = model_config.get_text_config()
    context = getattr(text_config, "max_position_embeddings", None)
    if context is not None and max_seq_length > context:
        raise ConfigError(f"max_seq_length={max_seq_length} exceeds the model's context of {context} tokens")
    return {key: value for key, value in text_config.to_dict().items() if key != SOURCE_KEY}

# The key the project's shipped config.json files (configs/models) carry to name the hub repo they were
# copied from; not a model setting, so every reader drops it.
SOURCE_KEY = "_source"

# Weight files in Python's pickle format (torch.load): unpickling can run arbitrary code.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

def check_safetensors_weights(model_name: str) -> None:
    """A one-line UserError for a local model directory whose weights are pickle files only (pytorch_model.bin):
    the project loads safetensors only, because unpickling a file can run any code it carries. Reads file
    names only. A hub id passes (from_pretrained asks the hub for safetensors); no weights at all is
    from_pretrained's to report."""
    directory = Path(model_name)
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern)})
    if pickles:
        raise UserError(f"{directory} has only pickle weights ({', '.join(pickles[:3])}); safetensors is required "
                        "because loading a pickle can run code hidden in it: convert it where you trust the file "
                        "(from_pretrained(dir).save_pretrained(new_dir) writes model.safetensors)")

# The class name transformers 5 writes for a tokenizer with no model-specific class, and the name of the same
# class that transformers 4.x (llama.cpp's converter pins 4.57) and 5.x both load.
GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}

def save_tokenizer(tokenizer, *directories: str | Path) -> None:
    """Save `tokenizer` into each directory so that transformers 4.57 loads it as well as 5.x: a generic
    tokenizer's class is written under the name both know (`GENERIC_TOKENIZER_CLASSES`)."""
    import json

    for directory in directories:
        tokenizer.save_pretrained(directory)
        config_file = Path(directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
            config["tokenizer_class"] = GENERIC_TOKENIZER_CLASSES[config["tokenizer_class"]]
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")

# bitsandbytes looks for an optional CPU kernel on the Hugging Face Hub when it is imported on a CPU with
# AVX512-BF16, and logs this when the `kernels` package (or the Hub) is not there. It then uses its own
# built-in CPU kernel, which is what this project measures and tests with; the notice is dropped.
BITSANDBYTES_NOTICES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}

class _DropMessage:
    """A logging filter dropping the records whose message template starts with `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)

def quiet_bitsandbytes_notices() -> None:
    """Drop bitsandbytes' notice about its optional Hub CPU kernel (see BITSANDBYTES_NOTICES); once per logger.
    Called before anything that may import bitsandbytes first (loading a config, a model, a tokenizer)."""
    import logging

    for name, prefix in BITSANDBYTES_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))

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

    quiet_bitsandbytes_notices()
    check_safetensors_weights(model_name)
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

def load_base_model(model_name: str, quantization_config, device: str, trust_remote_code: bool, dtype,
                    for_fsdp: bool):
    """`load_causal_lm` for training, logged as the run's "model" step (its start, then the weights' footprint).
    Returns (model, weight_footprint)."""
    step("model", "loading %s (%s) on %s", model_name, "4-bit" if quantization_config is not None else dtype, device)
    model = load_causal_lm(model_name, quantization_config, device, trust_remote_code, dtype=dtype, for_fsdp=for_fsdp)
    footprint = weight_footprint(model)
    step("model", "%s on %s: %s", model_name, device, describe_footprint(footprint))
    return model, footprint

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
    with pread (and with `heap.freed_blocks_leave_the_heap`) the load peaked at 0.99 GiB. A
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

    quiet_bitsandbytes_notices()
    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

def prepare_kbit_model(model, gradient_checkpointing: bool, keep_embeddings_bf16: bool = True):
    """peft's `prepare_model_for_kbit_training`, without its fp32 upcast of the frozen parameters.

    peft upcasts every non-4-bit parameter to fp32. For Qwen3-0.6B that is the 155.6M-parameter tied
    embedding/lm_head (0.29 GiB in bf16 -> 0.58 GiB in fp32), frozen, so it gains nothing from fp32; and
    the RMSNorm weights, which in fp32 turn the residual stream fp32: more activation memory, and a
    function that differs from the bf16 model the adapter is later served on (merged, or reloaded on
    the 4-bit base). With `keep_embeddings_bf16` (default) no parameter is upcast, as in TRL's own QLoRA
    recipe: what peft's function does besides the upcast is done here (every parameter frozen; gradient
    checkpointing switched on, non-reentrant, so no input needs grads), and the fp32 copies peft would make
    and drop (Qwen3-8B: 2.3 GiB for an untied embedding and head) are never made. The weights are those peft's
    upcast and a cast back would give, bit for bit (bf16 -> fp32 -> bf16 is exact). False keeps peft's upcast
    (a benchmark lever).
    """
    from peft import prepare_model_for_kbit_training

    if not keep_embeddings_bf16:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model

def keep_4bit_storage_layout(model) -> None:
    """No inference repacking of `model`'s 4-bit weights on CPU, for the model's whole life.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its own kernel on the first forward without
    gradients, for good, with its block scales rounded to bf16; unpacking it again (a state dict, as the adapter's
    save takes; the merge's dequantization) quantizes those rounded scales anew. The trained model keeps the layout
    it was trained in: the steps after a held-out evaluation, and those a resumed run redoes, compute the function
    the first steps did; its evaluations, generation check, merge-check reference and merge base are the function
    training computed, and no layer is converted back and forth (those conversions left up to 0.4 GiB of freed
    heap resident on the Qwen3-0.6B architecture). peft's DoRA needs it too: it dequantizes the base weight on
    every forward to take its norm, reading repacked bytes as if they were the storage layout (measured on the tiny
    test model: logits off by 0.06 at a scale of 1.2 when repacked).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False

def keep_4bit_weights_dequantizable(peft_model) -> None:
    """A reloaded DoRA adapter's 4-bit base kept in its storage layout (`keep_4bit_storage_layout`); plain LoRA,
    which never dequantizes in the forward, keeps bitsandbytes' faster inference kernel, as a user's load does."""
    if any(getattr(cfg, "use_dora", False) for cfg in getattr(peft_model, "peft_config", {}).values()):
        keep_4bit_storage_layout(peft_model)

def _cast_input_to_head_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def set_lm_head_dtype(model, dtype, weight=None, device=None) -> None:
    """Give lm_head its own weight in `dtype` (untied from the embedding when they were tied).

    `weight` (optional) is the head's saved tensor, used as is: a head loaded through a model-wide
    dtype cast would lose the bits the fp16 head keeps. When the head's dtype differs from the model's,
    its input is cast to it, so the model runs and the logits come out in `dtype`.
    """
    import torch

    head = model.get_output_embeddings()
    source = head.weight if weight is None else weight
    device = device if head.weight.device.type == "meta" else head.weight.device
    head.weight = torch.nn.Parameter(source.detach().to(device=device, dtype=dtype).clone(),
                                     requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    if dtype != model.get_input_embeddings().weight.dtype and not getattr(head, "_casts_input", False):
        head.register_forward_pre_hook(_cast_input_to_head_dtype)
        head._casts_input = True


def saved_lm_head(directory: str | Path):
    """lm_head.weight as saved in a model directory's safetensors (its own dtype), or None when tied."""

    try:
        return checkpoint_reader(str(directory))("lm_head.weight")
    except KeyError:
        return None


def checkpoint_bytes(directory: str | Path) -> int:
    """Bytes of a local checkpoint's safetensors files: what loading it whole takes."""
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def load_offloaded(directory: str | Path, device: str, budget_bytes: int, trust_remote_code: bool = False):
    """A 16-bit checkpoint directory that does not fit in `budget_bytes`, loaded by accelerate's big-model
    inference: decoder layers up to the budget on `device`, the rest left in host memory (GPU) or in the
    checkpoint's files on disk (CPU), each brought in for its forward and dropped after. Slower; bounded."""
    import tempfile

    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_bitsandbytes_notices()
    place = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device == "cuda" else "cpu")
    spill = "cpu" if device.startswith("cuda") else "disk"
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()
    # the embedding and the head stay on the device (a tied head is not in the files under its own name, and
    # both ends run for every token); the decoder layers share what is left of the budget
    ends = {name: module for name, module in skeleton.named_modules()
            if module is skeleton.get_input_embeddings() or module is skeleton.get_output_embeddings()}
    ends_bytes = sum(p.numel() * 2 for p in {id(p): p for m in ends.values() for p in m.parameters()}.values())
    device_map = infer_auto_device_map(
        skeleton, max_memory={place: max(budget_bytes - ends_bytes, 0),
                              spill: max(available_memory("cpu")[0] or 0, 1 << 40)},
        no_split_module_classes=skeleton._no_split_modules, dtype=config.dtype, clean_result=False)
    for name, module in skeleton.named_modules():
        # rotary tables are computed at load, not read from the files: kept on the device with the two ends
        if name in ends or (module._non_persistent_buffers_set and device_map.get(name) == spill):
            device_map[name] = place
    return AutoModelForCausalLM.from_pretrained(
        str(directory), dtype="auto", use_safetensors=True, trust_remote_code=trust_remote_code, device_map=device_map,
        offload_folder=tempfile.mkdtemp(prefix="qlora-offload-"))


def load_merged_dir(directory: str | Path, quantization_config=None, device: str | None = None,
                    trust_remote_code: bool = False, budget_bytes: int | None = None):
    """A merged model directory as `AutoModelForCausalLM.from_pretrained(directory)` loads it (the dtype
    its config names), placed on `device`, with one addition: an lm_head saved in another dtype than the
    model's (fp16) is kept in it, where plain `from_pretrained` casts it to the model's dtype.

    `quantization_config` re-quantizes the 16-bit weights on load (the NF4 artifact is made this way);
    a directory saved re-quantized carries its own quantization config and needs none. A 16-bit checkpoint
    larger than `budget_bytes` is loaded offloaded (`load_offloaded`): the same function, computed in less memory.
    """
    import torch

    device = device or pick_device()
    offload = (quantization_config is None and budget_bytes is not None and checkpoint_bytes(directory) > budget_bytes
               and not trust_remote_code)
    if budget_bytes is not None:
        step("check", "%s: %s of weights against %s of headroom: %s", Path(directory).name,
             format_size(checkpoint_bytes(directory)), format_size(max(budget_bytes, 0)),
             "offloaded (accelerate)" if offload else "loaded whole")
    if offload:
        model = load_offloaded(directory, device, budget_bytes, trust_remote_code)
    else:
        model = load_causal_lm(str(directory), quantization_config, device, trust_remote_code, dtype="auto")
    head = saved_lm_head(directory)
    if head is not None and head.dtype != torch.bfloat16:
        if offload:  # the saved head replaces the offloaded one: it is held in memory, in its own dtype
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(model.get_output_embeddings())
        set_lm_head_dtype(model, head.dtype, head, device=device)
    return model.eval()


def load_adapter_model(base_model: str, adapter_dir: str | Path, quantization_config=None, device: str | None = None,
                       trust_remote_code: bool = False):
    """The trained model: the adapter in `adapter_dir` on the base loaded by the same plan (4-bit for QLORA)."""
    from peft import PeftModel

    base = load_causal_lm(base_model, quantization_config, device, trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    keep_4bit_weights_dequantizable(model)
    return model
