"""Quantization plans, output names, metadata and detection.

Pure: no printing, nothing read from globals, no I/O but `base_model_name`'s look at whether a local
model path exists. Every quantization method the project knows is one `QuantMethod` member plus one
builder: `_PLAN_BUILDERS` for the methods 01_Train.py trains with, `PTQ_METHODS` + `_PTQ_BUILDERS` for
the post-training ones tools/quantize.py writes. Names, tags, metadata and detection all derive from
the `QuantSpec` a builder returns; every part of a directory name passes `safe_name_part`.
"""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

METADATA_SCHEMA_VERSION = 1

# Short dtype names used in tags and metadata ("head{dtype}") <-> torch dtype attribute names.
DTYPE_SHORT_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class QuantMethod(str, enum.Enum):
    """Every weight format an output directory of this project can hold."""

    NONE = "NONE"  # plain bf16 weights, no quantization
    QLORA = "QLORA"  # NF4 + double quant base during training (bitsandbytes), LoRA adapters on top
    # Post-training (tools/quantize.py): a quantized sibling of a 16-bit model directory.
    BNB_INT8 = "BNB_INT8"  # LLM.int8() weights (bitsandbytes), data-free
    BNB_NF4 = "BNB_NF4"  # 4-bit NF4 + double quant weights (bitsandbytes), data-free
    GPTQ = "GPTQ"  # GPTQ int4/int8 weights, 16-bit activations (llmcompressor -> compressed-tensors), calibrated
    W8A8 = "W8A8"  # SmoothQuant + GPTQ int8 weights, dynamic int8 activations (llmcompressor), calibrated

    @classmethod
    def parse(cls, value: str | QuantMethod) -> QuantMethod:
        if isinstance(value, QuantMethod):
            return value
        try:
            return cls(str(value).upper())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown quantization method {value!r}; allowed: {allowed}") from None


@dataclass(frozen=True)
class QuantSpec:
    """What a quantization method does to the weights, as recorded in metadata.json and the tag."""

    method: QuantMethod
    weights_bits: int
    lm_head_dtype: str  # short name of the head's dtype in the saved artifact: bf16 | fp16 | fp32
    backend: str  # library that stores/executes the format: bitsandbytes | torch | ...
    extras: Mapping[str, Any] = field(default_factory=dict)
    tag_label: str = ""  # the method's word in the tag; defaults to method.value
    tag_detail: str = ""  # e.g. "g128" for a group size, appended to w{bits}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "weights_bits": self.weights_bits,
            "lm_head_dtype": self.lm_head_dtype,
            "backend": self.backend,
            "extras": dict(self.extras),
        }


def short_dtype_name(dtype_name: str) -> str:
    """'bfloat16' -> 'bf16'; short names pass through; anything else is an error."""
    name = str(dtype_name).removeprefix("torch.")
    if name in DTYPE_SHORT_NAMES.values():
        return name
    if name not in DTYPE_SHORT_NAMES:
        raise ValueError(f"unsupported dtype {dtype_name!r}; allowed: {', '.join(DTYPE_SHORT_NAMES)}")
    return DTYPE_SHORT_NAMES[name]


# The method's word in tags and directory names, where it differs from the method's value (no "_": names
# are read back as "_"-separated words).
TAG_LABELS = {QuantMethod.NONE: "BF16", QuantMethod.BNB_INT8: "BNBINT8", QuantMethod.BNB_NF4: "BNBNF4"}


def tag_label(method: QuantMethod) -> str:
    return TAG_LABELS.get(method, method.value)


def _plan_none(lm_head_dtype: str, **_: Any):
    spec = QuantSpec(QuantMethod.NONE, 16, lm_head_dtype, "torch", {"dtype": "bfloat16"},
                     tag_label=tag_label(QuantMethod.NONE))
    return spec, None


def nf4_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16",
               quant_storage: str | None = None):
    """The one BitsAndBytesConfig of a 4-bit base: NF4, double quant, bf16 compute (QLoRA's, and BNB_NF4's)."""
    import torch
    from transformers import BitsAndBytesConfig

    bnb_kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                      bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    if quant_storage is not None:  # FSDP needs the packed storage dtype to equal the model dtype
        bnb_kwargs["bnb_4bit_quant_storage"] = getattr(torch, quant_storage)
    return BitsAndBytesConfig(**bnb_kwargs)


def _plan_qlora(
    lm_head_dtype: str,
    lora_r: int | None = None,
    merge_after_train: bool = True,
    compute_dtype: str = "bfloat16",
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: str | None = None,
    **_: Any,
):
    extras = {
        "double_quant": double_quant,
        "base_quant_type": quant_type,
        "compute_dtype": compute_dtype,
        "lora_r": lora_r,
        "merge_after_train": merge_after_train,
    }
    if quant_storage is not None:
        extras["quant_storage"] = quant_storage
    spec = QuantSpec(QuantMethod.QLORA, 4, lm_head_dtype, "bitsandbytes", extras)
    return spec, nf4_config(quant_type, double_quant, compute_dtype, quant_storage)


_PLAN_BUILDERS: dict[QuantMethod, Callable[..., tuple[QuantSpec, Any]]] = {
    QuantMethod.NONE: _plan_none,
    QuantMethod.QLORA: _plan_qlora,
}


def build_quantization_plan(method: QuantMethod | str, *, lm_head_dtype: str = "bf16", **options: Any):
    """Return `(spec, BitsAndBytesConfig | None)` for a method.

    QLORA: 4-bit NF4, double quantization, bfloat16 compute. `lm_head_dtype` is the dtype the head will
    have in the saved artifact (bitsandbytes never quantizes lm_head). Options a method does not use
    are ignored, so callers can pass one set of options for every method.
    """
    method = QuantMethod.parse(method)
    builder = _PLAN_BUILDERS.get(method)
    if builder is None:
        raise ValueError(f"{method.value} is a post-training method: use tools/quantize.py")
    return builder(short_dtype_name(lm_head_dtype), **options)


# ----- post-training quantization (tools/quantize.py) ---------------------------------------------------


@dataclass(frozen=True)
class PtqOptions:
    """What a post-training method accepts; the first value of each tuple is the default."""

    backend: str  # library that stores/executes the saved format
    bits: tuple[int, ...]
    group_sizes: tuple[int | None, ...]  # None: the method has no group size (per-channel or blockwise)
    calibrated: bool  # needs calibration data


PTQ_METHODS: dict[QuantMethod, PtqOptions] = {
    QuantMethod.BNB_INT8: PtqOptions("bitsandbytes", (8,), (None,), calibrated=False),
    QuantMethod.BNB_NF4: PtqOptions("bitsandbytes", (4,), (None,), calibrated=False),
    QuantMethod.GPTQ: PtqOptions("compressed-tensors", (4, 8), (128, 64, 32), calibrated=True),
    QuantMethod.W8A8: PtqOptions("compressed-tensors", (8,), (None,), calibrated=True),
}


def _ptq_bnb_int8(bits: int, group_size: int | None):
    import torch
    from transformers import BitsAndBytesConfig

    extras = {"quantizer": "bitsandbytes", "llm_int8_threshold": 6.0, "compute_dtype": "bfloat16"}
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, bnb_4bit_compute_dtype=torch.bfloat16)
    return extras, "", config


def _ptq_bnb_nf4(bits: int, group_size: int | None):
    # Double quant is not only smaller: on CPUs with AVX512-BF16, 4-bit weights saved after a forward pass
    # without it reload corrupted (bitsandbytes repacks them for its CPU kernel).
    extras = {"quantizer": "bitsandbytes", "double_quant": True, "base_quant_type": "nf4", "compute_dtype": "bfloat16"}
    return extras, "", nf4_config()


def _ptq_gptq(bits: int, group_size: int | None):
    extras = {"quantizer": "llmcompressor", "algorithm": "GPTQ", "scheme": f"W{bits}A16", "group_size": group_size,
              "symmetric": True, "ignore": ["lm_head"]}
    return extras, f"g{group_size}", None


def _ptq_w8a8(bits: int, group_size: int | None):
    extras = {"quantizer": "llmcompressor", "algorithm": "SmoothQuant+GPTQ", "scheme": "W8A8",
              "weights": "int8 per-channel symmetric", "activations": "int8 dynamic per-token",
              "smoothing_strength": 0.8, "ignore": ["lm_head"]}
    return extras, "", None


_PTQ_BUILDERS = {
    QuantMethod.BNB_INT8: _ptq_bnb_int8,
    QuantMethod.BNB_NF4: _ptq_bnb_nf4,
    QuantMethod.GPTQ: _ptq_gptq,
    QuantMethod.W8A8: _ptq_w8a8,
}


def _allowed_text(values) -> str:
    return ", ".join("none" if v is None else str(v) for v in values)


def build_ptq_plan(method: QuantMethod | str, *, bits: int | None = None, group_size: int | None = None,
                   lm_head_dtype: str = "bf16"):
    """Return `(spec, BitsAndBytesConfig | None)` for a post-training method; `bits`/`group_size` None = default.

    lm_head is never quantized: `lm_head_dtype` is the dtype it keeps. Unsupported values are a one-line
    ValueError naming the allowed ones.
    """
    allowed = ", ".join(m.value for m in PTQ_METHODS)
    try:
        method = QuantMethod.parse(method)
    except ValueError:
        raise ValueError(f"unknown quantization method {method!r}; allowed: {allowed}") from None
    if method is QuantMethod.QLORA:
        raise ValueError("QLORA quantizes during training: use Fine-tuning/01_Train.py (QUANT_METHOD = \"QLORA\")")
    if method not in PTQ_METHODS:
        raise ValueError(f"{method.value} is not a post-training method; allowed: {allowed}")
    options = PTQ_METHODS[method]
    bits = options.bits[0] if bits is None else bits
    if bits not in options.bits:
        raise ValueError(f"{method.value} does not support {bits}-bit weights; "
                         f"allowed bits: {_allowed_text(options.bits)}")
    group_size = options.group_sizes[0] if group_size is None else group_size
    if group_size not in options.group_sizes:
        raise ValueError(f"{method.value} does not support group size {group_size}; allowed group sizes: "
                         f"{_allowed_text(options.group_sizes)}")
    extras, detail, config = _PTQ_BUILDERS[method](bits, group_size)
    spec = QuantSpec(method, bits, short_dtype_name(lm_head_dtype), options.backend, extras,
                     tag_label=tag_label(method), tag_detail=detail)
    return spec, config


def sibling_dir_name(source_dir: str, source_metadata: Mapping[str, Any] | None, spec: QuantSpec) -> str:
    """Name of a PTQ sibling: the source's name with its quant tag replaced.

    A directory written by 01_Train.py (metadata with base_model, dataset, peft) gives
    `{base_model}-{dataset}_SFT_{peft}_{tag}`; a plain model directory gives `{dir name}_{tag}`. Every part
    read from the metadata goes through `safe_name_part`, so a file cannot steer the name out of its root.
    """
    meta = source_metadata or {}
    dataset = (meta.get("dataset") or {}).get("name")
    if meta.get("base_model") and dataset and meta.get("peft"):
        return output_dir_name(str(meta["base_model"]), str(dataset), str(meta["peft"]), spec,
                               stage=str(meta.get("stage", "SFT")))
    return f"{base_model_name(source_dir)}_{quant_tag(spec)}"


def quant_tag(spec: QuantSpec) -> str:
    """'QLORA_w4_headbf16', 'BF16_w16_headbf16', 'GPTQ_w4g128_headbf16', 'BNBNF4_w4_headbf16'."""
    label = spec.tag_label or spec.method.value
    return f"{label}_w{spec.weights_bits}{spec.tag_detail}_head{spec.lm_head_dtype}"


def peft_tag(peft_config: str, lora_r: int) -> str:
    """'LoRa' -> 'LoRa256', 'DoRa' -> 'DoRa256', 'Full' -> 'Full'."""
    return peft_config if peft_config == "Full" else f"{peft_config}{lora_r}"


def safe_name_part(text: str) -> str:
    """`text` as one part of a directory name: letters, digits, '.' and '-' only (anything else becomes '-'),
    no leading or trailing '.' or '-' (no '..', no hidden name, nothing read as a flag). Empty is an error."""
    part = re.sub(r"[^A-Za-z0-9.-]+", "-", str(text)).strip(".-")
    if not part:
        raise ValueError(f"cannot make a directory name from {text!r}: it needs a letter or digit")
    return part


def base_model_name(model_name: str) -> str:
    """The model's name in output names: 'Qwen/Qwen3-0.6B' -> 'Qwen3-0.6B'.

    A local path that exists gives its resolved directory's name ('models/X/.' -> 'X'); anything else its
    last path component, '.' and '..' taken lexically (a hub id, or a path recorded on another machine).
    """
    text = str(model_name)
    if text and Path(text).exists():
        name = Path(text).resolve().name
    else:
        name = posixpath.basename(posixpath.normpath(text.replace("\\", "/"))) if text else ""
    return safe_name_part(name)


def output_dir_name(model_name: str, dataset: str, peft: str, spec: QuantSpec, stage: str = "SFT") -> str:
    """`{base_model}-{dataset}_{stage}_{peft}_{quant_tag}`, e.g. Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16."""
    parts = [base_model_name(model_name), safe_name_part(dataset), safe_name_part(stage), safe_name_part(peft)]
    return f"{parts[0]}-{parts[1]}_{parts[2]}_{parts[3]}_{quant_tag(spec)}"


def build_metadata(spec: QuantSpec, **fields: Any) -> dict[str, Any]:
    """metadata.json content: the spec's `quantization` block first, then the caller's fields."""
    return {"schema_version": METADATA_SCHEMA_VERSION, "quantization": spec.to_dict(), **fields}


def detect_quant_method(name: str | None = None, metadata: Mapping[str, Any] | None = None) -> QuantMethod | None:
    """The method of an output directory: from its metadata when present, else from its name.

    A name is read as `_`-separated words; a word equal to a method's value or tag label counts
    ("...-openmath_SFT_LoRa256_QLORA_w4_headbf16" -> QLORA). Returns None when nothing matches.
    """
    if metadata:
        method = (metadata.get("quantization") or {}).get("method")
        if method is not None:
            return QuantMethod.parse(method)
    if name:
        words = set(re.split(r"[_\-/\\]", str(name)))
        for method in QuantMethod:  # NONE last: its "BF16" may also name a head dtype elsewhere
            if method is not QuantMethod.NONE and words & {method.value, tag_label(method)}:
                return method
        if tag_label(QuantMethod.NONE) in words:
            return QuantMethod.NONE
    return None
