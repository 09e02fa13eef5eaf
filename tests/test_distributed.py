"""Distributed launches: 2-process DDP (gloo, CPU) end to end, and the FSDP preflight and plan settings."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_TRAIN_ARGS, OPENMATH_SAMPLE, TRAIN_SCRIPT, run_python
from qlora.train.distributed import LaunchContext, check_launch, combine_peak_reports, launch_context, resolve_quant_storage
from quantization_utils import build_quantization_plan

NAME = "Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16"
BASE_CFG = {"QUANT_METHOD": "QLORA", "bnb_4bit_quant_storage": "auto", "optim": "adamw_torch", "PEFT_CONFIG": "LoRa",
            "init_lora_weights": "default"}
FSDP = LaunchContext(world_size=2, rank=0, local_rank=0, fsdp=True)


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(TRAIN_SCRIPT), f"--MODEL_NAME={tiny_model_dir}",
         f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}", *FAST_TRAIN_ARGS],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_ddp_writes_the_tagged_directory_once(ddp_run):
    out, result = ddp_run
    assert [p.name for p in out.iterdir()] == [NAME]
    assert result.stderr.count("; wrote ") == 1 and "DDP launch: 2 processes" in result.stderr


def test_ddp_metadata_covers_both_ranks_and_the_loss_agrees(ddp_run):
    out, _ = ddp_run
    meta = json.loads((out / NAME / "metadata.json").read_text())
    training = meta["training"]
    assert training["world_size"] == 2 and training["steps"] == 12
    first, second = training["loss_curve_by_rank"]
    assert first == second == training["loss_curve"] and len(first) == 6
    assert meta["peak_memory"]["world_size"] == 2 and len(meta["peak_memory"]["peak_rss_gib_per_rank"]) == 2
    assert meta["merge_check"]["passed"] and meta["artifact"]["kind"] == "merged_bf16"


def test_ddp_merged_model_loads(ddp_run):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = ddp_run
    model = AutoModelForCausalLM.from_pretrained(out / NAME)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_every_exit_of_main_leaves_the_process_group(tmp_path):
    # a group left to the interpreter's exit-time destructors can abort a rank after a good run
    code = f"""
import runpy, sys, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
main = runpy.run_path({str(TRAIN_SCRIPT)!r})["main"]
try:
    main(["--lora_r=0"])
except SystemExit as exit:
    print("exit:", exit)
print("group left:", not dist.is_initialized())
"""
    result = run_python(code, timeout=120)
    assert "exit: error: lora_r" in result.stdout and "group left: True" in result.stdout, result.stderr[-2000:]


def test_launch_context_reads_torchrun_and_accelerate_variables():
    ctx = launch_context({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "ACCELERATE_USE_FSDP": "true"})
    assert ctx == LaunchContext(4, 3, 1, True) and ctx.distributed and not ctx.is_main
    single = launch_context({})
    assert not single.distributed and single.is_main


def test_fsdp_stores_4bit_weights_in_the_model_dtype():
    assert resolve_quant_storage("auto", fsdp=True) == "bfloat16"
    assert resolve_quant_storage("auto", fsdp=False) is None
    _, bnb = build_quantization_plan("QLORA", quant_storage=resolve_quant_storage("auto", fsdp=True))
    import torch
    assert bnb.bnb_4bit_quant_storage == torch.bfloat16 and bnb.bnb_4bit_use_double_quant


@pytest.mark.parametrize("override, message", [
    ({"bnb_4bit_quant_storage": "uint8"}, "must equal the model dtype (bfloat16)"),
    ({"bnb_4bit_quant_storage": "float32"}, "must equal the model dtype (bfloat16)"),
    ({"optim": "paged_adamw_32bit"}, "paged optimizer state lives outside what FSDP's sharded checkpoints"),
    ({"PEFT_CONFIG": "DoRa"}, "PEFT_CONFIG='DoRa' under FSDP is not supported"),
    ({"PEFT_CONFIG": "Full"}, "PEFT_CONFIG='Full' under FSDP is not supported"),
    ({"init_lora_weights": "loftq"}, "loftq"),
])
def test_fsdp_preflight_refuses_silently_broken_combinations(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_launch(FSDP, {**BASE_CFG, **override}, cuda_available=True)
    check_launch(FSDP, BASE_CFG, cuda_available=True)  # the shipped FSDP settings pass


def test_fsdp_on_cpu_is_refused_before_loading(tiny_model_dir, tmp_path):
    env_result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}",
         f"--OUTPUT_ROOT={tmp_path / 'out'}", "--optim=adamw_torch"],
        capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_FSDP": "true"}, timeout=120)
    assert env_result.returncode != 0
    assert env_result.stderr.strip().splitlines()[-1].startswith("error: FSDP needs CUDA GPUs")
    assert not (tmp_path / "out").exists()


def test_combined_peak_report_lists_every_gpu_with_its_rank():
    reports = [{"device": "cuda", "overall_max_reserved_gib": 2.0, "overall_max_allocated_gib": 1.5, "peak_rss_gib": 3.0,
                "per_gpu": [{"gpu": 0, "peak_allocated_gib": 1.5, "peak_reserved_gib": 2.0}]},
               {"device": "cuda", "overall_max_reserved_gib": 2.5, "overall_max_allocated_gib": 1.0, "peak_rss_gib": 2.0,
                "per_gpu": [{"gpu": 1, "peak_allocated_gib": 1.0, "peak_reserved_gib": 2.5}]}]
    combined = combine_peak_reports(reports)
    assert [(g["rank"], g["gpu"]) for g in combined["per_gpu"]] == [(0, 0), (1, 1)]
    assert combined["overall_max_reserved_gib"] == 2.5 and combined["overall_max_allocated_gib"] == 1.5
    assert combined["peak_rss_gib"] == 3.0 and combined["world_size"] == 2
