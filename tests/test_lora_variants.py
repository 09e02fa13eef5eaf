"""rsLoRA scaling, LoftQ and gaussian initialisation, and DoRA on the 4-bit base (QDoRA): each one trains,
merges into the function it trained and is recorded in adapter_config.json and metadata.json."""

import json
import math

import pytest

from qlora.core.errors import ConfigError
from qlora.config import training_defaults, validate_config
from conftest import FAST_TRAIN_ARGS, run_python, train_on_openmath_sample

QDORA_NAME = "Qwen3-0.6B-openmath_SFT_DoRa256_QLORA_w4_headbf16"
LOFTQ_NAME = "Qwen3-0.6B-openmath_SFT_LoRa16_QLORA_w4_headbf16"


def _train(model_dir, out, *extra):
    return train_on_openmath_sample(model_dir, out, *FAST_TRAIN_ARGS, *extra)


def _read(directory):
    return (json.loads((directory / "metadata.json").read_text()),
            json.loads((directory / "adapter" / "adapter_config.json").read_text()))


@pytest.fixture(scope="module")
def qdora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qdora")
    _train(tiny_model_dir, out, "--PEFT_CONFIG=DoRa", "--init_lora_weights=gaussian")
    return out / QDORA_NAME


@pytest.fixture(scope="module")
def loftq_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loftq")
    result = _train(tiny_model_dir, out, "--init_lora_weights=loftq", "--use_rslora=true", "--lora_r=16",
                    "--merge_base=auto")
    return out / LOFTQ_NAME, result


def _bf16_rounding(logit_scale: float) -> float:
    return 2.0 ** (math.floor(math.log2(max(logit_scale, 1e-30))) - 7)


def test_qdora_trains_under_qlora_and_says_so_everywhere(qdora_run):
    meta, adapter_config = _read(qdora_run)
    assert meta["quantization"]["method"] == "QLORA" and meta["peft"] == "DoRa256"
    assert meta["peft_options"] == {"type": "DoRa", "use_dora": True, "use_rslora": False,
                                    "init_lora_weights": "gaussian", "lora_r": 256, "lora_alpha": 16,
                                    "scaling": 16 / 256}
    assert adapter_config["use_dora"] is True and adapter_config["init_lora_weights"] == "gaussian"
    assert adapter_config["use_rslora"] is False
    assert "DoRA r=256, alpha=16, scale 0.0625 (alpha / r), init gaussian" in (qdora_run / "README.md").read_text()


def test_qdora_merge_is_the_trained_function(qdora_run):
    """The merge folds DoRA's magnitude in on the dequantized weights: the merged bf16 model gives the trained
    QDoRA model's logits up to bf16 rounding (re-quantizing, or a wrong norm, is far outside that)."""
    meta, _ = _read(qdora_run)
    check = meta["merge_check"]
    assert check["passed"] and check["chosen_base"] == "dequantized"
    assert check["max_abs_logit_diff"] <= 2 * _bf16_rounding(check["candidates"]["dequantized"]["max_abs_logit"])


def test_qdora_adapter_reloads_on_the_4bit_base_as_the_merged_model(qdora_run):
    code = f"""
import sys, torch
from qlora.model.loading import load_adapter_model, load_merged_dir
from quantization_utils import build_quantization_plan
from qlora.checks.logits import logits_on
_, bnb = build_quantization_plan('QLORA')
import json
base = json.load(open({str(qdora_run / 'metadata.json')!r}))['base_model']
batch = [{{'input_ids': torch.tensor([[5, 9, 30, 41, 7, 12, 3]]), 'attention_mask': torch.ones(1, 7, dtype=torch.long)}}]
adapter = load_adapter_model(base, {str(qdora_run / 'adapter')!r}, bnb, 'cpu')
first, again = logits_on(adapter, batch)[0].float(), logits_on(adapter, batch)[0].float()  # the second forward runs on whatever the first left
merged = logits_on(load_merged_dir({str(qdora_run)!r}, None, 'cpu'), batch)[0].float()
print('RESULT', (again - merged).abs().max().item(), (first - again).abs().max().item(), merged.abs().max().item())
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    to_merged, between_forwards, scale = map(float, line.split()[1:])
    assert between_forwards == 0.0
    assert to_merged <= 2 * _bf16_rounding(scale)


def test_loftq_with_rslora_is_recorded_and_merges_on_the_dequantized_base(loftq_run):
    directory, result = loftq_run
    meta, adapter_config = _read(directory)
    assert meta["peft_options"]["init_lora_weights"] == "loftq" and meta["peft_options"]["use_rslora"] is True
    assert meta["peft_options"]["scaling"] == 16 / math.sqrt(16)
    # peft records a 4-bit LoftQ adapter as its default init: "loftq" there would rerun LoftQ on every load
    assert adapter_config["use_rslora"] is True and adapter_config["init_lora_weights"] is True
    assert "LoftQ init: ||W - model|| / ||W||" in result.stderr
    assert "LoRA r=16, alpha=16, scale 4 (rsLoRA: alpha / sqrt(r)), init loftq" in (directory / "README.md").read_text()
    check = meta["merge_check"]
    assert check["passed"] and check["chosen_base"] == "dequantized"
    # on the 16-bit weights the quantization error the adapter already corrects counts twice
    assert check["candidates"]["original"]["mean_kl"] > 10 * check["candidates"]["dequantized"]["mean_kl"]


def _four_bit_peft(model_dir, **lora):
    from peft import LoraConfig, get_peft_model

    from qlora.model.loading import load_causal_lm
    from quantization_utils import build_quantization_plan

    _, bnb = build_quantization_plan("QLORA")
    model = load_causal_lm(str(model_dir), bnb, "cpu")
    return get_peft_model(model, LoraConfig(target_modules=["q_proj", "down_proj"], lora_dropout=0.0, **lora))


@pytest.mark.parametrize("rank, use_rslora", [(8, False), (8, True), (256, False)])
def test_loftq_starts_at_the_best_rank_r_correction_of_the_quantization_error(tiny_model_dir, rank, use_rslora):
    """scale * B @ A is the rank-r truncated SVD of W - dequant(NF4(W)), whatever the scale; a rank at or above
    the layer's smaller dimension corrects it entirely."""
    import torch

    from qlora.model.checkpoint import checkpoint_reader
    from qlora.model.base_weights import dense_weight
    from qlora.train.peft import loftq_initialise

    model = _four_bit_peft(tiny_model_dir, r=rank, lora_alpha=16, use_rslora=use_rslora)
    error = loftq_initialise(model, str(tiny_model_dir))
    name = "model.layers.1.self_attn.q_proj"
    module = model.base_model.model.get_submodule(name)
    original = checkpoint_reader(str(tiny_model_dir))(f"{name}.weight").float()
    residual = original - dense_weight(module.get_base_layer())
    singular = torch.linalg.svdvals(residual)
    left = (residual - module.get_delta_weight("default").detach().float()).norm().item()
    assert left == pytest.approx(singular[rank:].norm().item(), rel=1e-3, abs=1e-5)
    assert error["after"] < error["before"]
    if rank >= min(residual.shape):
        assert error["after"] < 1e-3 * error["before"]


def test_dora_merged_weight_is_what_the_layer_computes(tiny_model_dir):
    """W' = m * (W + s B A) / ||W + s B A|| per output row gives the QDoRA layer's output; leaving out the
    magnitude (a plain LoRA merge) does not."""
    import torch
    import torch.nn.functional as F

    from qlora.model.base_weights import dense_weight
    from qlora.merge.weights import merged_weight

    model = _four_bit_peft(tiny_model_dir, r=8, lora_alpha=16, use_dora=True)
    module = model.base_model.model.get_submodule("model.layers.1.self_attn.q_proj")
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(std=0.05)
        module.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.7, 1.3, module.out_features))
    model.train()  # bf16 kernels in both: the comparison is of the function, not of a CPU repacking
    x = torch.randn(3, module.in_features)
    with torch.no_grad():
        expected = module(x.to(torch.bfloat16)).float()
        base = dense_weight(module.get_base_layer())
        dora = F.linear(x, merged_weight(module, "default", base.clone()))
        lora_only = F.linear(x, base + module.get_delta_weight("default").float())
    scale = expected.abs().max().item()
    assert (dora - expected).abs().max().item() < 2e-2 * scale
    assert (lora_only - expected).abs().max().item() > 0.1 * scale


@pytest.mark.parametrize("override, message", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is unknown; allowed: default, gaussian, loftq"),
    ({"init_lora_weights": "loftq", "QUANT_METHOD": "NONE"}, "init_lora_weights=loftq needs QUANT_METHOD=QLORA"),
    ({"init_lora_weights": "loftq", "PEFT_CONFIG": "DoRa"}, "init_lora_weights=loftq needs QUANT_METHOD=QLORA and "
                                                             "PEFT_CONFIG=LoRa"),
    ({"init_lora_weights": "loftq", "merge_base": "original"}, "merge_base=original with init_lora_weights=loftq"),
])
def test_lora_options_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config({**training_defaults(), **override})


def test_recorded_scaling_is_the_one_peft_applies(tiny_model_dir):
    from peft import get_peft_model

    from qlora.model.loading import load_causal_lm
    from qlora.train.peft import lora_config, peft_options

    for use_rslora, expected in ((False, 16 / 64), (True, 16 / 8)):
        cfg = {**training_defaults(), "lora_r": 64, "lora_alpha": 16, "use_rslora": use_rslora}
        model = get_peft_model(load_causal_lm(str(tiny_model_dir)), lora_config(cfg))
        applied = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
        assert applied == {peft_options(cfg)["scaling"]} == {expected}


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_qdora_with_rslora_on_other_architectures_merges_into_what_it_trained(family, request, tmp_path):
    """Llama and Gemma 3 base models (no chat template): QDoRA with rsLoRA scaling trains, its merge passes the
    check on the dequantized base, and both options reach adapter_config.json and metadata.json."""
    model_dir = request.getfixturevalue(f"{family}_base_dir")
    # a high rate, so the learned magnitudes move well away from their start (the row norms of the base)
    _train(model_dir, tmp_path, "--PEFT_CONFIG=DoRa", "--use_rslora=true", "--lora_r=8", "--lora_alpha=8",
           "--learning_rate=2e-2")
    (directory,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    meta, adapter_config = _read(directory)
    assert meta["peft"] == "DoRa8" and meta["peft_options"]["scaling"] == 8 / math.sqrt(8)
    assert adapter_config["use_dora"] is True and adapter_config["use_rslora"] is True
    check = meta["merge_check"]
    assert check["passed"] and check["chosen_base"] == "dequantized" and meta["artifact"]["kind"] == "merged_bf16"
    # the trained function up to bf16 rounding (Gemma's deeper stack of bf16 norms gave 2.5 rounding steps in one
    # run); a merge that drops DoRA's magnitude fails this on both models (0.70 against a bound of 0.016 here)
    assert check["max_abs_logit_diff"] <= 4 * _bf16_rounding(check["candidates"]["dequantized"]["max_abs_logit"])
