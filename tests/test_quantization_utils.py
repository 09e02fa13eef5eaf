import pytest
import torch

from conftest import SEED_QUANTIZATION_BLOCK
from quantization_utils import (PTQ_METHODS, QuantMethod, build_metadata, build_ptq_plan,
                                build_quantization_plan, detect_quant_method, output_dir_name, peft_tag, quant_tag,
                                sibling_dir_name)


def test_qlora_plan_is_nf4_double_quant_bf16_compute():
    spec, bnb = build_quantization_plan("QLORA", lora_r=256, merge_after_train=True)
    assert bnb.load_in_4bit and not bnb.load_in_8bit
    assert bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_use_double_quant is True
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert spec.method is QuantMethod.QLORA and spec.weights_bits == 4 and spec.backend == "bitsandbytes"


def test_none_plan_has_no_quantization_config():
    spec, bnb = build_quantization_plan(QuantMethod.NONE)
    assert bnb is None and spec.weights_bits == 16
    assert quant_tag(spec) == "BF16_w16_headbf16"


def test_quant_storage_option_reaches_bitsandbytes():
    spec, bnb = build_quantization_plan("QLORA", quant_storage="bfloat16")
    assert bnb.bnb_4bit_quant_storage == torch.bfloat16
    assert spec.extras["quant_storage"] == "bfloat16"


def test_metadata_block_matches_the_seed_field_for_field():
    spec, _ = build_quantization_plan("QLORA", lora_r=256, merge_after_train=True)
    meta = build_metadata(spec, base_model="Qwen/Qwen3-0.6B")
    assert meta["quantization"] == SEED_QUANTIZATION_BLOCK
    assert meta["base_model"] == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize("model_name", ["Qwen/Qwen3-0.6B", "/data/models/Qwen3-0.6B", "/data/models/Qwen3-0.6B/"])
def test_output_name_follows_the_convention(model_name):
    spec, _ = build_quantization_plan("QLORA", lora_r=256)
    name = output_dir_name(model_name, "openmath", peft_tag("LoRa", 256), spec)
    assert name == "Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16"


def test_head_tag_follows_the_head_dtype():
    spec, _ = build_quantization_plan("QLORA", lm_head_dtype="float16", lora_r=64)
    assert quant_tag(spec) == "QLORA_w4_headfp16" and spec.lm_head_dtype == "fp16"
    assert output_dir_name("Qwen/Qwen3-0.6B", "squad", peft_tag("LoRa", 64), spec) == \
        "Qwen3-0.6B-squad_SFT_LoRa64_QLORA_w4_headfp16"


def test_peft_tag():
    assert peft_tag("LoRa", 512) == "LoRa512" and peft_tag("DoRa", 8) == "DoRa8" and peft_tag("Full", 8) == "Full"


def test_detection_prefers_metadata_then_name():
    assert detect_quant_method(name="Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16") is QuantMethod.QLORA
    assert detect_quant_method(name="Qwen3-0.6B-openmath_SFT_Full_BF16_w16_headbf16") is QuantMethod.NONE
    assert detect_quant_method(name="Qwen3-0.6B") is None
    assert detect_quant_method(name="QLORAish-model") is None  # a word, not a substring
    meta = {"quantization": {"method": "QLORA"}}
    assert detect_quant_method(name="anything", metadata=meta) is QuantMethod.QLORA
    assert detect_quant_method(name="x_QLORA_y", metadata={"quantization": {"method": "NONE"}}) is QuantMethod.NONE


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: NONE, QLORA, BNB_INT8, BNB_NF4, GPTQ, W8A8$"):
        build_quantization_plan("INT3")


@pytest.mark.parametrize("method", list(PTQ_METHODS))
def test_training_refuses_post_training_methods(method):
    with pytest.raises(ValueError, match=f"{method.value} is a post-training method: use tools/quantize.py"):
        build_quantization_plan(method)


@pytest.mark.parametrize("method, options, tag", [
    ("GPTQ", {}, "GPTQ_w4g128_headbf16"),
    ("GPTQ", {"bits": 8, "group_size": 32}, "GPTQ_w8g32_headbf16"),
    ("W8A8", {}, "W8A8_w8_headbf16"),
    ("BNB_NF4", {}, "BNBNF4_w4_headbf16"),
    ("BNB_INT8", {"lm_head_dtype": "float16"}, "BNBINT8_w8_headfp16"),
])
def test_ptq_tags_and_detection(method, options, tag):
    spec, _ = build_ptq_plan(method, **options)
    assert quant_tag(spec) == tag
    assert detect_quant_method(name=f"Qwen3-0.6B-openmath_SFT_LoRa256_{tag}") is QuantMethod(method)


def test_ptq_plans_record_their_parameters():
    spec, bnb = build_ptq_plan("BNB_NF4")
    assert bnb.load_in_4bit and bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_quant_type == "nf4"
    assert spec.extras["double_quant"] is True and spec.backend == "bitsandbytes"
    spec, bnb = build_ptq_plan("BNB_INT8")
    assert bnb.load_in_8bit and not bnb.load_in_4bit and spec.weights_bits == 8
    spec, bnb = build_ptq_plan("GPTQ", group_size=64)
    assert bnb is None and spec.backend == "compressed-tensors"
    assert spec.extras["scheme"] == "W4A16" and spec.extras["group_size"] == 64 and spec.extras["ignore"] == ["lm_head"]


@pytest.mark.parametrize("method, options, message", [
    ("QLORA", {}, "QLORA quantizes during training: use Fine-tuning/01_Train.py"),
    ("NONE", {}, "NONE is not a post-training method; allowed: BNB_INT8, BNB_NF4, GPTQ, W8A8"),
    ("INT3", {}, "unknown quantization method 'INT3'; allowed: BNB_INT8, BNB_NF4, GPTQ, W8A8"),
    ("W8A8", {"bits": 4}, "W8A8 does not support 4-bit weights; allowed bits: 8"),
    ("GPTQ", {"group_size": 256}, "GPTQ does not support group size 256; allowed group sizes: 128, 64, 32"),
])
def test_ptq_plan_errors_name_what_is_allowed(method, options, message):
    with pytest.raises(ValueError, match=message):
        build_ptq_plan(method, **options)


def test_sibling_name_replaces_the_tag_or_appends_it():
    spec, _ = build_ptq_plan("GPTQ")
    trained = {"base_model": "Qwen/Qwen3-0.6B", "dataset": {"name": "openmath"}, "peft": "LoRa256"}
    assert sibling_dir_name("Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16", trained, spec) == \
        "Qwen3-0.6B-openmath_SFT_LoRa256_GPTQ_w4g128_headbf16"
    assert sibling_dir_name("/models/Qwen3-0.6B", None, spec) == "Qwen3-0.6B_GPTQ_w4g128_headbf16"


