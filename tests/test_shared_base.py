"""tools/shared_base.py on outputs of the shipped demo model (trained weights: the NF4 rounding of its base is large
enough that an adapter on the 16-bit base computes another function): the shared bf16 base is written once and
reused, the adapter on it with PEFT's defaults (no bitsandbytes) reproduces the merged model, a wrong base fails
the check, and strangers' directories and bad input are one line."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import FAST_TRAIN_ARGS, ROOT, train_on_openmath_sample
from qlora.outputs.read import read_metadata
from qlora.outputs.shared_base import KEY_FILE, SHARED_BASES, publish_once
from tools.compare_adapter_bases import main as compare_adapter_bases
from tools.shared_base import main as shared_base

DEMO_MODEL = ROOT / "models" / "Qwen3-arith-1M"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"merged": dir, "adapter": dir}: a merged and an adapter-only run of the demo model, in one OUTPUT_ROOT."""
    out = tmp_path_factory.mktemp("shared_base_outputs")
    train_on_openmath_sample(DEMO_MODEL, out, *FAST_TRAIN_ARGS, "--lora_r=8")
    train_on_openmath_sample(DEMO_MODEL, out, *FAST_TRAIN_ARGS, "--lora_r=4", "--merge_after_train=false")
    return {("merged" if "LoRa8" in d.name else "adapter"): d for d in out.iterdir() if d.name != SHARED_BASES}


# Loaded as a user without bitsandbytes loads it: the adapter by AutoPeftModelForCausalLM with defaults (the base it
# names), the merged model, and the adapter on the original 16-bit base; KL(merged || each) on held-out text.
NO_BNB_CLIENT = """
import json, sys, torch
sys.modules["bitsandbytes"] = None  # not installed, as far as this client knows
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM, PeftModel
run, base = sys.argv[1], sys.argv[2]
ids = AutoTokenizer.from_pretrained(run)(["What is 12 + 30? 42. And 7 * 6 = 42; 99 - 57 = 42."], return_tensors="pt")
def log_probs(model):
    with torch.no_grad():
        return torch.log_softmax(model(**ids).logits.float(), -1)
merged = log_probs(AutoModelForCausalLM.from_pretrained(run))
shared = log_probs(AutoPeftModelForCausalLM.from_pretrained(run + "/adapter"))
original = log_probs(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run + "/adapter"))
kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean().item()
print(json.dumps({"shared": kl(merged, shared), "original": kl(merged, original)}))
"""


def test_adapter_on_the_shared_base_is_the_merged_model_with_peft_defaults(runs):
    run = runs["merged"]
    record = shared_base([str(run)])
    assert record["passed"] and record["written_now"] and record["check_rows"] == "8 held-out rows"
    shared = run.parent / SHARED_BASES
    (directory,) = shared.iterdir()
    assert record["path"] == str(directory)
    mask = os.umask(0)
    os.umask(mask)
    assert (directory / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # shared: not 0600
    assert directory.stat().st_mode & 0o777 == 0o777 & ~mask
    card = (directory / "README.md").read_text()
    assert f"from_pretrained({str(directory)!r}" in card and "bitsandbytes" in card
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(directory)
    assert read_metadata(run)["shared_base"]["mean_kl"] == record["mean_kl"]
    assert str(directory) in (run / "adapter" / "README.md").read_text()
    result = subprocess.run([sys.executable, "-c", NO_BNB_CLIENT, str(run), str(DEMO_MODEL)], capture_output=True,
                            text=True, timeout=300, cwd=str(ROOT / "tests"))
    assert result.returncode == 0, result.stderr[-2000:]
    kl = json.loads(result.stdout.strip().splitlines()[-1])
    merge_check = read_metadata(run)["merge_check"]
    assert kl["shared"] <= merge_check["kl_limit"]  # the merged model, at the merge check's level
    assert kl["original"] > 20 * kl["shared"]  # what PEFT's defaults gave before: another function


def test_a_second_run_on_the_same_base_reuses_it(runs):
    shared_base([str(runs["merged"])])  # written once (or already, by the test above)
    (directory,) = (runs["merged"].parent / SHARED_BASES).iterdir()
    weights = directory / "model.safetensors"
    written = weights.stat().st_mtime_ns
    record = shared_base([str(runs["adapter"])])  # an adapter-only run, another LoRA rank, the same base and plan
    assert record["passed"] and not record["written_now"] and record["path"] == str(directory)
    assert weights.stat().st_mtime_ns == written
    assert [d.name for d in directory.parent.iterdir()] == [directory.name]  # nothing staged left behind


def test_a_wrong_base_fails_the_check_and_the_adapter_is_left_alone(runs, tmp_path):
    """A shared base holding the original 16-bit weights instead of the dequantized ones (what PEFT's defaults load)
    is refused by the check: exit status 1, adapter_config.json unchanged."""
    root = tmp_path / "root"
    shared_base([str(runs["adapter"]), f"--root={root}"])
    (directory,) = (root / SHARED_BASES).iterdir()
    save_file(load_file(DEMO_MODEL / "model.safetensors"), directory / "model.safetensors", metadata={"format": "pt"})
    config_file = runs["adapter"] / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "untouched"
    config_file.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        shared_base([str(runs["adapter"]), f"--root={root}"])
    assert exit_info.value.code == 1
    assert json.loads(config_file.read_text())["base_model_name_or_path"] == "untouched"
    assert not read_metadata(runs["adapter"])["shared_base"]["passed"]


def test_a_strangers_directory_in_its_place_is_refused(runs, tmp_path):
    root = tmp_path / "root"
    shared_base([str(runs["adapter"]), f"--root={root}"])
    (directory,) = (root / SHARED_BASES).iterdir()
    key_file = directory / KEY_FILE
    recorded = json.loads(key_file.read_text())
    recorded["key"]["base_model"] = "someone/else"
    key_file.write_text(json.dumps(recorded))
    with pytest.raises(SystemExit) as exit_info:
        shared_base([str(runs["adapter"]), f"--root={root}"])
    assert "written from another base or plan" in str(exit_info.value.code)
    key_file.unlink()
    with pytest.raises(SystemExit) as exit_info:
        shared_base([str(runs["adapter"]), f"--root={root}"])
    assert "not a shared base this project wrote" in str(exit_info.value.code)


def test_too_little_disk_is_one_line_and_leaves_nothing(runs, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1024))
    with pytest.raises(SystemExit) as exit_info:
        shared_base([str(runs["adapter"]), f"--root={tmp_path}"])
    assert "not enough free disk" in str(exit_info.value.code) and "the shared base" in str(exit_info.value.code)
    assert list((tmp_path / SHARED_BASES).iterdir()) == []  # the staged copy removed


def test_two_writers_at_once_keep_the_first_and_mix_nothing(tmp_path):
    final = tmp_path / "base"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text(name)
    assert publish_once(tmp_path / "first", final)
    assert not publish_once(tmp_path / "second", final)
    assert (final / "model.safetensors").read_text() == "first" and not (tmp_path / "second").exists()


@pytest.mark.parametrize("case", ["missing", "no_metadata", "unfinished", "full_finetune"])
def test_bad_directories_are_one_line(case, tmp_path):
    directory = tmp_path / "run"
    if case != "missing":
        directory.mkdir()
    if case == "unfinished":
        (directory / "checkpoints").mkdir()
    if case == "full_finetune":
        (directory / "metadata.json").write_text(json.dumps({"artifact": {"kind": "full_bf16", "adapter_dir": None}}))
    with pytest.raises(SystemExit) as exit_info:
        shared_base([str(directory)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / SHARED_BASES).exists()


def test_a_gemma_adapter_passes_on_its_shared_base(gemma_base_dir, tmp_path):
    """Gemma 3 (tied and scaled embedding, softcapped logits, four norms a layer): the adapter of an adapter-only run
    passes the check on its shared base and the config names it."""
    train_on_openmath_sample(gemma_base_dir, tmp_path, *FAST_TRAIN_ARGS, "--max_steps=4", "--merge_after_train=false")
    (run,) = [d for d in tmp_path.iterdir() if d.name != SHARED_BASES]
    record = shared_base([str(run)])
    assert record["passed"] and record["mean_kl"] <= record["kl_limit"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == record["path"]


def test_compare_adapter_bases_scores_each_way_a_client_loads_the_adapter(runs):
    shared_base([str(runs["merged"])])  # adapter_config.json names the shared base (written, or reused)
    results = compare_adapter_bases([str(runs["merged"]), "--rows=4", "--max-new-tokens=8", "--device=cpu"])
    kl = {r["loaded as"].split(" (")[0]: r["mean_kl_vs_trained"] for r in results}
    assert list(kl) == ["trained", "merged", "PEFT defaults", "adapter on the original 16-bit base"]
    assert kl["trained"] == 0.0 and all(r["rows"] == 4 and "accuracy" in r for r in results)
    assert kl["PEFT defaults"] <= read_metadata(runs["merged"])["merge_check"]["kl_limit"]
    assert kl["adapter on the original 16-bit base"] > 20 * kl["PEFT defaults"]


def test_the_check_falls_back_on_fixed_texts_when_the_held_out_rows_are_gone(tmp_path):
    """A run whose dataset file was moved (or a hub dataset offline) is still checked, on FALLBACK_TEXTS, and says so."""
    from qlora.model.loading import load_tokenizer
    from qlora.outputs.shared_base import FALLBACK_TEXTS, check_batches

    def moved(metadata, rows):
        raise FileNotFoundError(f"{tmp_path}/rows.jsonl")

    batches, rows = check_batches(tmp_path, {"config": {"max_seq_length": 128}}, load_tokenizer(str(DEMO_MODEL)), moved)
    assert len(batches) == len(FALLBACK_TEXTS) and rows.startswith(f"{len(FALLBACK_TEXTS)} fixed texts")
    assert all(b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] > 5 for b in batches)
