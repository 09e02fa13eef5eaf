"""End to end: a few QLoRA steps on a tiny Qwen3, then every artifact checked from a fresh process."""

import json

import pytest
import yaml
from safetensors import safe_open

from conftest import FAST_TRAIN_ARGS, OPENMATH_SAMPLE, SEED_QUANTIZATION_BLOCK, run_python, run_train
from qlora.planner.memory import CPU_RUNTIME_BYTES, GIB

EXPECTED_NAME = "Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
                        *FAST_TRAIN_ARGS, "--save_steps=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_output_directory_is_named_exactly(trained):
    out, _ = trained
    assert [p.name for p in out.iterdir()] == [EXPECTED_NAME]  # nothing else: no staging dir left behind


def test_metadata_has_the_seed_block_and_true_values(trained):
    out, _ = trained
    meta = json.loads((out / EXPECTED_NAME / "metadata.json").read_text())
    assert meta["quantization"] == SEED_QUANTIZATION_BLOCK
    assert meta["config"]["PEFT_CONFIG"] == "LoRa" and meta["peft"] == "LoRa256"
    assert meta["peft_options"] == {"type": "LoRa", "use_dora": False, "use_rslora": False,
                                    "init_lora_weights": "default", "lora_r": 256, "lora_alpha": 16,
                                    "scaling": 16 / 256}
    assert meta["training"]["steps"] == 12
    assert meta["artifact"]["kind"] == "merged_bf16" and meta["merge_check"]["passed"]
    assert 0 < meta["parameters"]["trainable"] < meta["parameters"]["total"]
    assert meta["peak_memory"]["peak_rss_gib"] > 0 and "overall_max_allocated_gib" in meta["peak_memory"]
    # on CPU the plan starts from what the process held at the plan step, measured, below what the run then reached
    plan = meta["memory_plan"]
    assert plan["parts"]["runtime"] == plan["setup"]["runtime_bytes"] != CPU_RUNTIME_BYTES
    assert 0.2 * GIB < plan["parts"]["runtime"] < meta["peak_memory"]["by_phase"]["train"]["rss_gib"] * GIB
    assert set(meta["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl"}


def test_loss_goes_down(trained):
    out, _ = trained
    losses = json.loads((out / EXPECTED_NAME / "metadata.json").read_text())["training"]["loss_curve"]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_saved_lm_head_dtype_equals_the_tag(trained):
    out, _ = trained
    directory = out / EXPECTED_NAME
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        head_key = "lm_head.weight" if "lm_head.weight" in keys else "model.embed_tokens.weight"  # tied
        assert f.get_slice(head_key).get_dtype() == "BF16"
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)  # no leftover 4-bit or fp32 tensors
    assert EXPECTED_NAME.endswith("headbf16")


def test_merged_model_loads_in_a_fresh_process_without_bitsandbytes(trained):
    out, _ = trained
    directory = out / EXPECTED_NAME
    code = f"""
import sys, torch
sys.modules['bitsandbytes'] = None  # the merged model must not need it
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(directory)!r})
tok = AutoTokenizer.from_pretrained({str(directory)!r})
assert getattr(model.config, 'quantization_config', None) is None
ids = tok.apply_chat_template([{{'role': 'user', 'content': 'Ada has 3 apples.'}}], add_generation_prompt=True,
                              return_tensors='pt', return_dict=True)
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print('OK', model.dtype, out.shape[1] > ids['input_ids'].shape[1])
import json
from qlora.checks.logits import fingerprint_difference, logits_fingerprint
recorded = json.load(open({str(directory / "metadata.json")!r}))['artifact']['fingerprints']['merged']
print('FINGERPRINT DIFF', fingerprint_difference(recorded, logits_fingerprint(model.eval(), recorded['input_ids'])))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK torch.bfloat16 True" in result.stdout
    difference = float(result.stdout.split("FINGERPRINT DIFF")[1].split()[0])
    assert difference == 0.0  # the logits recorded at save time, measured on the saved directory reloaded


def test_adapter_loads_with_peftmodel_on_the_4bit_base(trained, tiny_model_dir):
    out, _ = trained
    directory = out / EXPECTED_NAME
    code = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
from quantization_utils import build_quantization_plan
spec, bnb = build_quantization_plan('QLORA')
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, quantization_config=bnb, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, {str(directory / 'adapter')!r}).eval()
merged = AutoModelForCausalLM.from_pretrained({str(directory)!r}).eval()
ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
with torch.no_grad():
    a, b = model(ids).logits.float(), merged(ids).logits.float()
kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item()
print('KL', kl)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    kl = float(result.stdout.split("KL")[-1])
    assert kl < 1e-3  # adapter-on-4bit and merged model are the same function up to bf16 rounding


def test_existing_output_is_refused(trained, tiny_model_dir):
    out, _ = trained
    result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
                        *FAST_TRAIN_ARGS])
    assert result.returncode != 0
    assert f"output directory {out / EXPECTED_NAME} exists" in result.stderr.strip().splitlines()[-1]


def test_the_run_log_has_no_bitsandbytes_hub_kernel_notice(trained):
    _, result = trained
    assert "kernels-community" not in result.stderr


def test_cards_loss_plot_and_absolute_paths(trained, tiny_model_dir):
    out, _ = trained
    directory = out / EXPECTED_NAME
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["dataset"]["path"] == str(OPENMATH_SAMPLE.resolve()) and meta["base_model"] == str(tiny_model_dir)
    training = meta["training"]
    assert training["loss_steps"] == [2, 4, 6, 8, 10, 12]
    assert training["eval_loss_steps"] == [4, 8, 12] and training["eval_loss_curve"][-1] == training["eval_loss"]
    assert (directory / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (directory / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "qlora" in front["tags"] and "base_model" not in front  # local
    assert "## Merge check" in card and f"on {meta['merge_check']['tokens']} held-out tokens" in card
    adapter_front = yaml.safe_load((directory / "adapter" / "README.md").read_text().split("---\n")[1])
    assert adapter_front["library_name"] == "peft" and adapter_front["pipeline_tag"] == "text-generation"


def test_adapter_directory_describes_its_base(trained, tiny_model_dir):
    out, _ = trained
    adapter = out / EXPECTED_NAME / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # a local base, absolute
    assert json.loads((adapter / "base_quantization_config.json").read_text())["bnb_4bit_quant_type"] == "nf4"
    for directory in (adapter, adapter.parent):  # a class name transformers 4.57 (llama.cpp's converter) also loads
        assert json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"] != "TokenizersBackend"


def test_adapter_loads_from_its_own_files_with_auto_peft(trained):
    """What a user does from the card, with no project code: the 4-bit plan comes from the adapter directory."""
    out, _ = trained
    directory = out / EXPECTED_NAME
    code = f"""
import json, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
adapter = {str(directory / "adapter")!r}
bnb = BitsAndBytesConfig.from_dict(json.load(open(adapter + "/base_quantization_config.json")))
model = AutoPeftModelForCausalLM.from_pretrained(adapter, quantization_config=bnb, dtype=torch.bfloat16).eval()
print("BASE", type(model.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__)
merged = AutoModelForCausalLM.from_pretrained({str(directory)!r}).eval()
ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
with torch.no_grad():
    a, b = model(ids).logits.float(), merged(ids).logits.float()
print("KL", (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item())
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BASE Linear4bit" in result.stdout
    assert float(result.stdout.split("KL")[-1]) < 1e-3


def test_the_cards_code_runs_verbatim_from_another_folder(trained, tmp_path):
    """Each Python block of the model card (the merged model; the adapter on its 4-bit base), pasted as is and run
    from an unrelated working directory, loads the model: the card names the output and the base by absolute paths."""
    import re
    import subprocess
    import sys

    out, _ = trained
    card = (out / EXPECTED_NAME / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 2  # the merged model, the adapter
    for block in blocks:
        code = block + "\nprint('LOADED', type(model).__name__)\n"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0 and "LOADED" in result.stdout, (block, result.stderr[-2000:])
