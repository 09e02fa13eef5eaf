"""What an output directory tells its users: the model card (model_card.py), the loss plot (loss_plot.py), the
self-describing adapter/, tokenizer files older transformers load, the report_to constant, and the quiet
bitsandbytes import. Rendered from metadata dicts as 01_Train.py writes them; the end-to-end checks on a
trained directory are in test_train_e2e.py."""

import json
import os
import subprocess

import pytest
import yaml

from qlora.core.errors import ConfigError
from conftest import run_python
from qlora.outputs.loss_plot import write_loss_plot
from qlora.outputs.model_card import (adapter_card, base_model_license, bnb_code, bnb_arguments, ptq_card, training_card,
                                      write_model_cards)
from quantization_utils import build_metadata, build_quantization_plan

NAME = "Qwen3-0.6B-openmath_SFT_LoRa8_QLORA_w4_headbf16"
PATH = f"/outputs/{NAME}"  # where the cards say the directory was published
CONFIG = {"PEFT_CONFIG": "LoRa", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj"],
          "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
          "optim": "paged_adamw_8bit", "max_seq_length": 128, "max_train_samples": 200, "eval_samples": 16}
TRAINING = {"steps": 12, "train_loss": 6.07, "eval_loss": 5.99, "loss_curve": [6.2, 6.1, 6.0], "loss_steps": [4, 8, 12],
            "eval_loss_curve": [6.06, 6.0, 5.99], "eval_loss_steps": [4, 8, 12], "train_seconds": 60.0}
MERGE_CHECK = {"passed": True, "mean_kl": 4.7e-07, "max_abs_logit_diff": 0.0049, "tokens": 453, "max_kl": 5e-3,
               "chosen_base": "dequantized", "artifact_candidate": "dequantized", "trained_loss": 6.11,
               "candidates": {"dequantized": {"mean_kl": 4.7e-07, "max_abs_logit_diff": 0.0049, "loss": 6.11},
                              "original": {"mean_kl": 2.1e-03, "max_abs_logit_diff": 0.31, "loss": 6.2}}}


def metadata(base_model="Qwen/Qwen3-0.6B", method="QLORA", kind="merged_bf16", **extra):
    spec, _ = build_quantization_plan(method, lora_r=8, merge_after_train=True)
    return build_metadata(spec, base_model=base_model, peft="LoRa8", config=dict(CONFIG),
                          dataset={"name": "openmath", "path": None, "train_rows": 200, "eval_rows": 16, "split_seed": 42},
                          artifact={"kind": kind, "primary": "merged", "adapter_dir": "adapter"}, training=dict(TRAINING),
                          merge_check=MERGE_CHECK if kind != "adapter_only" else None, **extra)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_merged_card_front_matter_follows_hub_conventions():
    card = training_card(metadata(), NAME, None, PATH)
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen3-0.6B" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["nvidia/OpenMathInstruct-2"]  # the registry's hub dataset: no local file was given
    assert {"qlora", "lora", "merged"} <= set(meta["tags"])
    for section in ("## How it was trained", "## Merge check", "## How to load", "![training and held-out loss]"):
        assert section in card
    assert "4-bit NF4, double quantization, bfloat16 compute" in card
    assert "## Generation check" not in card and "## Evaluation" not in card  # neither recorded


def test_adapter_card_is_peft_and_its_bitsandbytes_config_is_the_training_plan():
    card = adapter_card(metadata(), NAME, None, PATH)
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert meta["base_model"] == "Qwen/Qwen3-0.6B"  # the hub links an adapter to its base by this field
    assert "base_model:adapter:Qwen/Qwen3-0.6B" in meta["tags"] and "qlora" in meta["tags"]
    assert "trained on the **4-bit NF4 quantization**" in card and "base_quantization_config.json" in card
    # the config shown in the card, run as Python, is the one the run trained with
    import torch
    from transformers import BitsAndBytesConfig

    shown = eval(bnb_code(bnb_arguments(metadata())), {"torch": torch, "BitsAndBytesConfig": BitsAndBytesConfig})
    _, planned = build_quantization_plan("QLORA")
    assert shown.to_dict() == planned.to_dict()
    assert "BitsAndBytesConfig(\n    load_in_4bit=True," in card


def test_local_base_and_data_are_named_in_the_text_not_the_front_matter():
    meta = metadata(base_model="/models/Qwen3-0.6B")
    meta["dataset"]["path"] = "/data/rows.jsonl"
    card = training_card(meta, NAME, None, PATH)
    assert "base_model" not in front_matter(card) and "datasets" not in front_matter(card)
    assert "`/models/Qwen3-0.6B`" in card and "/data/rows.jsonl" in card


def test_card_code_names_the_published_directory_and_what_to_change_after_a_copy():
    card = training_card(metadata(base_model="/models/Qwen3-0.6B"), NAME, None, PATH)
    assert f"from_pretrained({PATH!r}" in card and f"PeftModel.from_pretrained(base, '{PATH}/adapter')" in card
    assert f"replace `{PATH}` with its new path, and `/models/Qwen3-0.6B` with the base model's" in card
    assert f"python tools/chat.py {PATH}" in card
    hub_card = training_card(metadata(), NAME, None, PATH)
    assert f"replace `{PATH}` with its new path." in hub_card  # a hub base needs no change


def test_the_base_models_license_is_carried_into_the_front_matter(tmp_path):
    """A local base whose card names a license: the run records it and both cards carry it; a base without a card,
    or with one that does not parse, has none (not a guess)."""
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# a base\n")
    assert base_model_license(str(tmp_path)) == "apache-2.0"
    assert base_model_license(str(tmp_path / "missing")) is None and base_model_license("Qwen/not-cached") is None
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert base_model_license(str(tmp_path)) is None
    meta = metadata(base_license="apache-2.0")
    assert front_matter(training_card(meta, NAME, None, PATH))["license"] == "apache-2.0"
    assert front_matter(adapter_card(meta, NAME, None, PATH))["license"] == "apache-2.0"
    assert "license" not in front_matter(training_card(metadata(), NAME, None, PATH))


def test_the_adapter_card_shows_the_shared_base_only_once_it_passed():
    shared = {"path": "/outputs/shared-bases/Qwen3-0.6B-nf4-dq-bf16-0123456789", "passed": True, "mean_kl": 2e-4,
              "max_abs_logit_diff": 0.3, "kl_limit": 5e-3, "check_rows": "8 held-out rows"}
    card = adapter_card(metadata(shared_base=shared), NAME, None, PATH)
    assert f"AutoPeftModelForCausalLM.from_pretrained('{PATH}/adapter')" in card and shared["path"] in card
    assert "# or: AutoPeftModelForCausalLM" not in card  # the config names the shared base now, not the 4-bit one
    assert "names the shared base: copy it too" in card
    failed = adapter_card(metadata(shared_base={**shared, "passed": False}), NAME, None, PATH)
    assert shared["path"] not in failed and "tools/shared_base.py" in failed


def test_ptq_card_tags_its_own_format_not_the_sources_bitsandbytes():
    source = metadata()
    for method, present, absent in (("GPTQ", {"gptq", "compressed-tensors", "qlora", "lora"}, {"bitsandbytes", "nf4"}),
                                    ("BNB_NF4", {"bitsandbytes", "nf4", "qlora"}, set())):
        meta = {"quantization": {"method": method, "weights_bits": 4, "lm_head_dtype": "bf16", "extras": {}},
                "source": {"dir": "/outputs/x", "metadata": source}, "artifact": {"kind": "ptq"}}
        tags = front_matter(ptq_card(meta, f"{NAME}-{method}", None, PATH))["tags"]
        assert present <= set(tags) and not absent & set(tags) and len(tags) == len(set(tags)), (method, tags)


def test_bf16_lora_and_adapter_only_cards():
    card = adapter_card(metadata(method="NONE"), NAME, None, PATH)
    assert "BitsAndBytesConfig" not in card and "trained on the bf16 base" in card
    assert "qlora" not in front_matter(card)["tags"]
    only = training_card(metadata(kind="adapter_only"), NAME, None, PATH)
    assert front_matter(only)["library_name"] == "peft" and "## Merge check" not in only
    assert "### The merged model" not in only and "### The adapter" in only


def test_flagged_merge_says_the_adapter_is_primary():
    meta = metadata()
    meta["artifact"]["primary"] = "adapter"
    meta["merge_check"] = {**MERGE_CHECK, "passed": False}
    card = training_card(meta, NAME, None, PATH)
    assert "adapter (`adapter/`, on the base it was trained on) is the primary artifact" in card
    assert "**FAILED" in card


def test_generation_check_evaluation_and_exports_are_rendered_when_present():
    meta = metadata(generation_check={"prompts": 16, "stop_rate": 0.9375, "mean_new_tokens": 41.5, "max_new_tokens": 128,
                                      "samples": [{"prompt": "Ada has 3 apples.", "output": "She has \\boxed{3}."}]},
                    exports=[{"format": "gguf", "file": f"{NAME}-bf16.gguf", "outtype": "bf16", "architecture": "qwen3",
                              "tensors": 24, "bytes": 1000, "converter": "llama.cpp 0c1e57098"}])
    results = {"accuracy": 73.0, "heldout_loss": 0.4, "rows": 100, "load_kind": "merged", "device": "cpu",
               "dataset": {"name": "openmath", "path": "/data/rows.jsonl", "seed": 42}, "max_new_tokens": 48}
    card = training_card(meta, NAME, results, PATH)
    assert "## Generation check" in card and "94% ended with an end-of-sequence token" in card
    assert "She has \\boxed{3}." in card
    assert "## Evaluation" in card and "| accuracy (%) | 73 |" in card
    assert "## Exports" in card and f"`{NAME}-bf16.gguf`" in card and "| qwen3 | 24 |" in card


def test_write_model_cards_from_metadata_json(tmp_path):
    directory = tmp_path / NAME
    (directory / "adapter").mkdir(parents=True)
    (directory / "adapter" / "adapter_config.json").write_text("{}")
    (directory / "metadata.json").write_text(json.dumps(metadata()))
    (directory / "eval_results.json").write_text(json.dumps({"accuracy": 70.0, "load_kind": "adapter", "rows": 4,
                                                             "dataset": {"name": "openmath"}}))
    written = write_model_cards(directory)
    assert written == [directory / "README.md", directory / "adapter" / "README.md"]
    assert "| accuracy (%) | 70 |" in (directory / "adapter" / "README.md").read_text()  # evaluated as the adapter
    assert "(../training_loss.png)" in (directory / "adapter" / "README.md").read_text()


# ----- loss plot -------------------------------------------------------------------------------------------

def test_loss_plot_is_drawn_from_metadata(tmp_path):
    path = write_loss_plot(tmp_path, metadata())
    assert path == tmp_path / "training_loss.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sibling = {"artifact": {"kind": "ptq"}, "source": {"metadata": metadata()}}  # a PTQ sibling draws its source's run
    (tmp_path / "s").mkdir()
    assert write_loss_plot(tmp_path / "s", sibling) == tmp_path / "s" / "training_loss.png"
    assert write_loss_plot(tmp_path, {"training": {"loss_curve": []}}) is None


# ----- adapter and tokenizer files --------------------------------------------------------------------------

def test_describe_adapter_names_a_local_base_absolutely_and_a_hub_id_as_given(tmp_path, monkeypatch):
    """The adapter loads from any working directory: a local base given relative to the run's is written
    absolute; a hub id stays a hub id."""
    from transformers import BitsAndBytesConfig

    from qlora.train.adapter import BASE_QUANTIZATION_FILE, describe_adapter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "Qwen3-0.6B").mkdir(parents=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    _, bnb = build_quantization_plan("QLORA")
    for given, written in (("models/Qwen3-0.6B", str(tmp_path / "models" / "Qwen3-0.6B")),
                           ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B")):
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "peft_type": "LORA"}))
        describe_adapter(adapter, given, bnb)
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == written
    saved = BitsAndBytesConfig.from_dict(json.loads((adapter / BASE_QUANTIZATION_FILE).read_text()))
    assert saved.to_dict() == bnb.to_dict()


def test_saved_tokenizer_names_a_class_transformers_4_and_5_load(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from qlora.model.loading import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    save_tokenizer(tokenizer, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Ada has 3 apples and buys 14 more."
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"] and again.chat_template == tokenizer.chat_template
    old = os.environ.get("TRANSFORMERS_457_PYTHON")  # a Python with transformers 4.57 (llama.cpp's converter pins it)
    if not old:
        pytest.skip("set TRANSFORMERS_457_PYTHON to a Python with transformers 4.57 to check the older reader too")
    code = (f"from transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
            f"print(t.__class__.__name__, t({text!r})['input_ids'], t.eos_token)")
    result = subprocess.run([old, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("[")[1].split("]")[0] == ", ".join(map(str, tokenizer(text)["input_ids"]))
    assert result.stdout.strip().endswith(tokenizer.eos_token)


# ----- report_to and the bitsandbytes notice ----------------------------------------------------------------

def test_report_to_is_checked_against_the_trainers_integrations():
    from importlib.util import find_spec

    from qlora.train.options import check_report_to, report_to_list

    check_report_to("none")
    assert report_to_list("none") == [] and report_to_list("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"report_to='tensorbored': tensorbored is not a tracker .* allowed: none, "
                                          r"all, .*tensorboard.*trackio.*wandb"):
        check_report_to("tensorbored")
    if find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="wandb is not installed in this Python"):
            check_report_to("wandb")


def test_the_kernels_community_notice_is_dropped_and_nothing_else():
    code = """
import logging, sys
from qlora.model.loading import quiet_bitsandbytes_notices
quiet_bitsandbytes_notices(); quiet_bitsandbytes_notices()
import bitsandbytes
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
log.warning("another bitsandbytes warning")
print(len(log.filters))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernels-community" not in result.stderr and "another bitsandbytes warning" in result.stderr
    assert result.stdout.strip() == "1"  # installed once, however often it is called
