"""Bits-per-parameter accounting, the kbit preparation that keeps the head bf16, and the memory planner,
on tiny Qwen3 models built here. The full Qwen3-0.6B benchmark is behind the slow marker."""

import json
import math
from pathlib import Path

import pytest
import torch

from qlora.checks.logits import CHECK_ROW_COPIES, COMPARE_CHUNK_TOKENS
from qlora.planner.memory import CPU_LOSS_TILES, QUANT_BITS, TrainingSetup, lora_parameter_count, parameter_counts, plan_load_memory, plan_training_memory
from qlora.core.memory import GIB, count_parameters, describe_footprint, weight_footprint
from qlora.model.fixtures import build_random_model, train_bpe_tokenizer
from qlora.model.loading import load_causal_lm, prepare_kbit_model

# Wide enough that every Linear has whole 64-blocks and 256-groups of them.
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=512)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tokenizer = train_bpe_tokenizer(["Ada has 3 apples and 4 more."] * 20, 300)
    out = tmp_path_factory.mktemp("mem") / "tiny"
    build_random_model(out, tokenizer, **TINY)
    return out


def bnb(quant_type, double_quant):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)


def tiny_config(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def expected_quantized_bytes(cfg, double_quant):
    """Everything bitsandbytes stores per 4-bit weight of n params: n/2 packed bytes, one absmax per 64
    (fp32, or uint8 plus an fp32 absmax per 256 and an fp32 offset with double quant), the 16-entry
    4-bit code (fp32) and, with double quant, the 256-entry 8-bit map (fp32) that all weights share."""
    from qlora.planner.memory import _linear_shapes

    total = 0
    for i, o in _linear_shapes(cfg).values():
        n = i * o
        blocks = math.ceil(n / 64)
        per_tensor = n // 2 + 16 * 4
        per_tensor += blocks + math.ceil(blocks / 256) * 4 + 4 if double_quant else blocks * 4
        total += per_tensor
    return total * cfg["num_hidden_layers"] + (256 * 4 if double_quant else 0)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_weight_footprint_counts_every_stored_byte_of_4bit_weights(tiny_dir, quant_type, double_quant):
    cfg = tiny_config(tiny_dir)
    model = load_causal_lm(str(tiny_dir), bnb(quant_type, double_quant), "cpu")
    footprint = weight_footprint(model)
    assert footprint["quantized_params"] == parameter_counts(cfg)["linear"]
    assert footprint["quantized_bytes"] == expected_quantized_bytes(cfg, double_quant)
    key = f"{quant_type}_dq" if double_quant else quant_type
    bits = footprint["quantized_bytes"] * 8 / footprint["quantized_params"]
    assert QUANT_BITS[key] < bits < QUANT_BITS[key] + 0.2  # per-tensor code tables on top of the per-param bits
    # bf16 weights: 2 bytes per parameter, tied embedding once
    bf16_model = load_causal_lm(str(tiny_dir), None, "cpu")
    buffers = sum(b.numel() * b.element_size() for b in bf16_model.buffers())  # rotary frequencies
    assert count_parameters(bf16_model)[1] == sum(parameter_counts(cfg).values())
    assert weight_footprint(bf16_model)["total_bytes"] == 2 * sum(parameter_counts(cfg).values()) + buffers


def test_loading_shares_the_double_quant_map_without_changing_the_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    private = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=bnb("nf4", True),
                                                   dtype=torch.bfloat16, device_map={"": "cpu"})
    shared = load_causal_lm(str(tiny_dir), bnb("nf4", True), "cpu")
    weights = 7 * tiny_config(tiny_dir)["num_hidden_layers"]
    assert weight_footprint(private)["quantized_bytes"] - weight_footprint(shared)["quantized_bytes"] == (weights - 1) * 1024
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.equal(private(ids).logits, shared(ids).logits)


def test_prepare_kbit_model_keeps_the_frozen_weights_bf16(tiny_dir):
    kept = prepare_kbit_model(load_causal_lm(str(tiny_dir), bnb("nf4", True), "cpu"), True)
    upcast = prepare_kbit_model(load_causal_lm(str(tiny_dir), bnb("nf4", True), "cpu"), True, keep_embeddings_bf16=False)
    assert kept.get_input_embeddings().weight.dtype == torch.bfloat16
    assert kept.get_output_embeddings().weight is kept.get_input_embeddings().weight  # still tied
    assert kept.model.norm.weight.dtype == torch.bfloat16  # fp32 norms would make the residual stream fp32
    assert upcast.get_input_embeddings().weight.dtype == torch.float32 and upcast.model.norm.weight.dtype == torch.float32
    saved = weight_footprint(upcast)["plain_bytes"] - weight_footprint(kept)["plain_bytes"]
    counts = parameter_counts(tiny_config(tiny_dir))
    assert saved == 2 * (counts["embedding"] + counts["norms"])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_quantizing_load_reads_the_checkpoint_without_mapping_it(tiny_dir, tmp_path):
    """load_causal_lm quantizes from tensors read with pread: the same model as from_pretrained gives,
    and no page of the checkpoint left mapped into the process (it would count in its memory)."""
    import shutil

    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "own-copy"  # a path no other test has mapped
    shutil.copytree(tiny_dir, model_dir)
    model = load_causal_lm(str(model_dir), bnb("nf4", True), "cpu")
    maps = open("/proc/self/maps").read()
    assert str(model_dir / "model.safetensors") not in maps
    assert model.name_or_path == model.config._name_or_path == str(model_dir)  # peft records it as the base
    plain = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb("nf4", True),
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert str(model_dir / "model.safetensors") in open("/proc/self/maps").read()  # the check above can fail
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_planner_counts_match_the_real_models(tiny_dir):
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config(tiny_dir)
    model = prepare_kbit_model(load_causal_lm(str(tiny_dir), bnb("nf4", True), "cpu"), True)
    plan = plan_training_memory(cfg, TrainingSetup(method="qlora", lora_r=8, seq_len=64))
    # weights: the planner's per-parameter bits, the real model adds only the per-tensor code tables
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    real = weight_footprint(model)["total_bytes"] - buffers
    tables = 2 * 7 * (16 * 4 + 4) + 256 * 4
    assert abs(plan["parts"]["weights"] - (real - tables)) <= 16 * cfg["num_hidden_layers"] * 7
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=list(plan_setup_targets())))
    trainable, total = count_parameters(peft_model)
    assert trainable == plan["trainable_params"] == lora_parameter_count(cfg, 8, plan_setup_targets())
    assert total - trainable == sum(parameter_counts(cfg).values())


def plan_setup_targets():
    return TrainingSetup().target_modules


def test_planner_breakdown_moves_with_each_lever():
    from qlora.model.fixtures import architecture_dimensions

    cfg = architecture_dimensions("Qwen3-0.6B")
    base = plan_training_memory(cfg, TrainingSetup())
    parts = base["parts"]
    assert set(parts) >= {"weights", "adapters", "gradients", "optimizer", "activations", "logits", "runtime"}
    assert base["train_peak_bytes"] == sum(parts.values())
    assert base["peak_bytes"] == max(base["train_peak_bytes"], base["load_peak_bytes"])
    assert base["trainable_params"] == 40_370_176  # r=64 on all 7 projections of Qwen3-0.6B
    no_gc = plan_training_memory(cfg, TrainingSetup(gradient_checkpointing=False))["parts"]["activations"]
    assert no_gc > 10 * parts["activations"]
    logits = plan_training_memory(cfg, TrainingSetup(fused_loss=False))["parts"]["logits"]
    assert logits == 512 * 151936 * 14  # bf16 logits, fp32 upcast, log-softmax, its gradient
    # TRL's chunked loss on CPU: fp32 (tokens, 32768) tiles over the 511 positions it scores
    assert parts["logits"] == int(CPU_LOSS_TILES * 511 * 32768 * 4)
    assert plan_training_memory(cfg, TrainingSetup(device="cuda"))["parts"]["logits"] == 0
    adam32 = plan_training_memory(cfg, TrainingSetup(optim="paged_adamw_32bit"))["parts"]["optimizer"]
    assert adam32 - parts["optimizer"] == 6 * 40_370_176  # 8 bytes of state per parameter instead of 2
    fp32 = plan_training_memory(cfg, TrainingSetup(embeddings_dtype="fp32"))
    assert fp32["parts"]["weights"] - parts["weights"] == 2 * 151936 * 1024
    full = plan_training_memory(cfg, TrainingSetup(method="full"))
    assert full["trainable_params"] == 596_049_920 and full["peak_bytes"] > 2 * base["peak_bytes"]
    cuda = plan_training_memory(cfg, TrainingSetup(device="cuda"))
    assert cuda["parts"]["runtime"] == 0 and cuda["peak_bytes"] < base["peak_bytes"]
    assert 1 < base["peak_bytes"] / GIB < 3
    linear = parameter_counts(cfg)["linear"]
    load = plan_load_memory(cfg, "nf4_dq")
    assert load["parts"].get("checkpoint_pages", 0) == 0 and load["parts"]["transient"] == 2 * 2 * 1024 * 3072  # pread
    # the embedding, read before the layers, is held twice while safetensors' pread reads it
    assert load["peak_bytes"] == load["parts"]["runtime"] + 2 * 2 * 151936 * 1024
    # k-bit preparation upcasts nothing (prepare_kbit_model): the load is the loading phase; with peft's upcast
    # (embeddings_dtype fp32) every 16-bit parameter gets an fp32 copy, the bf16 embedding still there
    counts = parameter_counts(cfg)
    assert base["load_peak_bytes"] == load["peak_bytes"]
    prep = (load["parts"]["runtime"] + int(linear * QUANT_BITS["nf4_dq"] / 8)
            + 4 * (counts["embedding"] + counts["norms"]) + 2 * counts["embedding"])
    assert plan_training_memory(cfg, TrainingSetup(embeddings_dtype="fp32"))["load_peak_bytes"] == prep
    mapped = plan_load_memory(cfg, "nf4_dq", checkpoint_mapped=True)
    assert mapped["parts"]["checkpoint_pages"] == 2 * linear  # plain from_pretrained: every page read stays
    trl_docs = plan_training_memory(cfg, TrainingSetup(checkpoint_mapped=True))
    assert trl_docs["train_peak_bytes"] - base["train_peak_bytes"] == 2 * linear
    assert plan_load_memory(cfg, None)["peak_bytes"] == plan_load_memory(cfg, None)["parts"]["runtime"]


@pytest.mark.parametrize("field,value,message", [
    ("method", "prefix", "method='prefix' is unknown; allowed: qlora, lora, full"),
    ("optim", "sgd", "optim='sgd' is unknown; allowed: paged_adamw_8bit"),
    ("quant", "int3", "quant='int3' is unknown"),
])
def test_planner_rejects_unknown_settings(field, value, message):
    from qlora.model.fixtures import architecture_dimensions

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan_training_memory(architecture_dimensions("Qwen3-0.6B"), TrainingSetup(**{field: value}))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's VmHWM")
def test_peak_rss_of_a_child_does_not_start_from_its_parents():
    """Benchmark workers are spawned by a parent that may hold a whole model; their peak is their own."""
    import subprocess
    import sys

    held = bytearray(400 * 1024**2)  # touched: 400 MiB resident in this process
    held[::4096] = b"x" * len(held[::4096])
    code = "from qlora.core.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 200 * 1024**2
    del held


def test_benchmark_rejects_unknown_cases_before_building_anything(tmp_path):
    from conftest import run_python

    result = run_python(f"from tools.benchmark import main; main(['--cases=qlora,nope', '--work-dir={tmp_path}'])")
    assert result.returncode == 2
    assert "unknown case(s) nope; allowed:" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_full_benchmark_meets_the_targets(tmp_path):
    """Qwen3-0.6B architecture, seq 512, r=64, batch 1: every case, then the targets as ratios of one run."""
    from tools.benchmark import main

    report = main([f"--work-dir={tmp_path}", f"--out={tmp_path / 'bench.json'}"])
    rows = {r["case"]["name"]: r for r in report["results"]}
    assert rows["weights_nf4_dq"]["bits_per_quantized_param"] <= 4.13
    assert rows["weights_nf4"]["bits_per_quantized_param"] <= 4.51
    assert rows["qlora"]["peak_ratio_vs_trl_docs"] <= 0.7
    assert rows["qlora"]["step_ratio_vs_lora_bf16"] <= 1.2
    for row in report["results"]:
        if "planner_error" in row:
            assert abs(row["planner_error"]) <= 0.15, row["case"]["name"]


def test_planner_counts_every_phase_after_training():
    from qlora.model.fixtures import architecture_dimensions
    from qlora.planner.memory import MERGE_LAYER_BYTES_PER_PARAM, plan_for_train_config, with_merge_check

    cfg = {"QUANT_METHOD": "QLORA", "PEFT_CONFIG": "LoRa", "full_weights_dtype": "bf16", "lora_r": 64,
           "max_seq_length": 512, "per_device_train_batch_size": 1, "gradient_checkpointing": True, "optim": "paged_adamw_32bit",
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    arch = architecture_dimensions("Qwen3-0.6B")
    adapter_only = plan_for_train_config(arch, {**cfg, "merge_after_train": False}, "cuda")
    merged = plan_for_train_config(arch, {**cfg, "merge_after_train": True}, "cuda")
    assert "merge_peak_bytes" not in adapter_only and "check_peak_bytes" not in adapter_only
    # the generation check runs on the trained model as it stays: below training's peak
    assert adapter_only["generation_peak_bytes"] < adapter_only["train_peak_bytes"]
    # the streamed merge: the trained model as it stays plus one layer's fp32 W, fp32 delta and bf16 result, and
    # (planned from the config alone: 8 rows of max_seq_length) a check row's logits
    stays = merged["parts"]["weights"] + merged["parts"]["adapters"]
    assert merged["merge_check_logits_bytes"] == 2 * 151936 * 512
    assert merged["merge_peak_bytes"] == (stays + MERGE_LAYER_BYTES_PER_PARAM * 1024 * 3072
                                          + merged["merge_check_logits_bytes"])
    # the merge check reloads the bf16 model (1.1 GiB) within what training took: never a new peak
    assert merged["check_peak_bytes"] <= merged["train_peak_bytes"]
    # on a small model with a large vocabulary the check row's logits bring the merge level with training
    assert merged["merge_peak_bytes"] < 1.05 * merged["train_peak_bytes"]
    # once the check rows are tokenized: on CPU the longest row's reference and candidate bf16 logits and eight
    # fp32 copies of a 16-token chunk (the trained model's logits are in files, read one row at a time); on CUDA only
    # the row's bf16 logits
    on_cpu = plan_for_train_config(arch, {**cfg, "merge_after_train": True}, "cpu")
    checked = with_merge_check(on_cpu, [100, 300], 151936, "cpu")
    assert checked["merge_check_logits_bytes"] == 151936 * (2 * 2 * 300 + 4 * CHECK_ROW_COPIES * COMPARE_CHUNK_TOKENS)
    assert checked["merge_peak_bytes"] == (on_cpu["merge_peak_bytes"] - on_cpu["merge_check_logits_bytes"]
                                           + checked["merge_check_logits_bytes"])
    assert with_merge_check(merged, [100, 300], 151936, "cuda")["merge_check_logits_bytes"] == 2 * 151936 * 300
    assert "merge_check_logits_bytes" not in with_merge_check(adapter_only, [100], 151936, "cpu")


def test_paged_optimizer_state_is_outside_cuda_max_allocated():
    from qlora.planner.memory import TrainingSetup, plan_training_memory
    from qlora.model.fixtures import architecture_dimensions

    arch = architecture_dimensions("Qwen3-0.6B")
    paged = plan_training_memory(arch, TrainingSetup(method="qlora", lora_r=64, optim="paged_adamw_32bit", device="cuda"))
    plain = plan_training_memory(arch, TrainingSetup(method="qlora", lora_r=64, optim="adamw_torch", device="cuda"))
    on_cpu = plan_training_memory(arch, TrainingSetup(method="qlora", lora_r=64, optim="paged_adamw_32bit", device="cpu"))
    assert paged["parts"]["optimizer_paged"] == plain["parts"]["optimizer"] == 8 * 40_370_176
    assert plain["train_peak_bytes"] - paged["train_peak_bytes"] == 8 * 40_370_176
    assert "optimizer" in on_cpu["parts"]  # unpaged on CPU: in the process's RSS


@pytest.mark.parametrize("total, words", [(300, "(70.0% less than bf16)"), (1003, "(as bf16)"), (2000, "(2.00x bf16)")])
def test_the_footprint_line_says_smaller_same_or_larger_than_bf16(total, words):
    mib = 2**20
    assert describe_footprint({"total_bytes": total * mib, "bf16_bytes": 1000 * mib}).endswith(words)


def test_fp32_master_weights_double_the_weights_and_gradients_of_full_fine_tuning():
    from qlora.model.fixtures import architecture_dimensions

    arch = architecture_dimensions("Qwen3-0.6B")
    plans = {dtype: plan_training_memory(arch, TrainingSetup(method="full", optim="paged_adamw_8bit", device="cpu",
                                                             full_weights_dtype=dtype))["parts"]
             for dtype in ("bf16", "fp32")}
    params = sum(parameter_counts(arch).values())
    assert plans["bf16"]["weights"] == plans["bf16"]["gradients"] == 2 * params
    assert plans["fp32"]["weights"] == plans["fp32"]["gradients"] == 4 * params
    assert plans["fp32"]["optimizer"] == plans["bf16"]["optimizer"] == 2 * params  # 8-bit state either way
    # bitsandbytes' CPU step copies a 16-bit parameter to fp32, and updates an fp32 one in place
    assert plans["bf16"]["optimizer_step"] * 5 == plans["fp32"]["optimizer_step"] * 6


def test_phase_peaks_files_memory_under_the_step_the_log_last_named():
    """The sampler reads the step name off each log line: memory taken after a `train` line is the train phase's,
    and a phase that never logged has no entry."""
    import time

    import numpy as np

    from qlora.core.logs import setup_logging, step
    from qlora.core.memory import phase_peaks

    setup_logging(is_main=True)  # as the run sets it up: the main process logs its steps
    with phase_peaks(interval=0.005) as phases:
        step("model", "loading")
        time.sleep(0.05)
        step("train", "training")
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        time.sleep(0.1)
        del block
        step("merge", "merging")
        time.sleep(0.05)
    report = phases.report()
    assert list(report) == ["start", "model", "train", "merge"]
    assert report["train"]["rss_gib"] - report["model"]["rss_gib"] > 0.25
    assert report["merge"]["rss_gib"] < report["train"]["rss_gib"] - 0.25


def test_the_trained_model_leaves_memory_before_the_merge_check(tiny_dir, tmp_path):
    """After training, the flow frees the trained model before it reloads the merged one: nothing may keep it alive.
    Two things did: bitsandbytes' process-wide optimizer registry (the Trainer registers the embedding there for
    32-bit state) and peft's bound prepare_inputs_for_generation, left on the tuner by a generate()."""
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from qlora.merge.weights import release_wrapped_model
    from qlora.train.adapter import take_trained_model

    base = prepare_kbit_model(load_causal_lm(str(tiny_dir), bnb("nf4", True), "cpu"), gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_8bit",
                                                          report_to="none", use_cpu=True))
    trainer.create_optimizer()  # where the Trainer registers the embedding with bitsandbytes
    model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    wrapped = weakref.ref(base)
    embedding = weakref.ref(base.get_input_embeddings().weight)
    del base

    model = take_trained_model(trainer, {}, None, "cpu", tmp_path / "adapter", fsdp=False)
    release_wrapped_model(model)
    gc.collect()
    assert wrapped() is None and embedding() is None


def test_cpu_training_gives_freed_heap_back_and_the_trained_model_keeps_its_4bit_layout(
        tiny_model_dir, tmp_path, monkeypatch):
    """A CPU QLoRA run through qlora.train.trainer: the C heap is trimmed after each step, between the decoder and the
    loss, and after each evaluation batch, and the decoder's hook is gone once training ends (generation would trim at
    every token). The trained model keeps the 4-bit layout it trained in through its evaluations and a generate():
    on a CPU with AVX512-BF16 bitsandbytes would repack every layer for inference there, with its block scales
    rounded to bf16, and the adapter's save and the merge would unpack each one again, re-quantizing those scales."""
    import bitsandbytes as bnb_lib

    import qlora.train.callbacks as callbacks
    from conftest import OPENMATH_SAMPLE
    from qlora.config import training_defaults
    from qlora.data.formats import load_rows, to_sft_dataset
    from qlora.model.loading import load_tokenizer
    from qlora.train.peft import prepare_for_training
    from qlora.train.trainer import build_trainer, train

    trims = []
    monkeypatch.setattr(callbacks, "release_free_heap", lambda: trims.append(1) or True)
    # every Linear4bit starts out allowed to repack, as on a CPU with AVX512-BF16, whatever this machine's CPU
    monkeypatch.setattr(bnb_lib.nn.modules, "has_avx512bf16", lambda: True)
    cfg = {**training_defaults(), "lora_r": 4, "max_steps": 2, "per_device_train_batch_size": 2,
           "gradient_accumulation_steps": 1, "max_seq_length": 64, "logging_steps": 1, "save_steps": 50}
    rows = to_sft_dataset(load_rows("openmath", OPENMATH_SAMPLE, 12), "openmath")
    model = prepare_for_training(load_causal_lm(str(tiny_model_dir), bnb("nf4", True), "cpu"), cfg, quantized=True)
    layers = [m for m in model.modules() if isinstance(m, bnb_lib.nn.Linear4bit)]
    absmax_before = [m.weight.quant_state.absmax.clone() for m in layers]
    trainer = build_trainer(model, load_tokenizer(str(tiny_model_dir)), cfg, rows.select(range(8)),
                            rows.select(range(8, 12)), tmp_path / "checkpoints", "cpu", save_strategy="no")
    decoder = model.get_base_model().get_decoder()
    result = train(trainer, None)

    # 2 steps x (a decoder forward, a step end) + 2 held-out batches, at least (checkpointing may recompute)
    assert result.steps == 2 and result.eval_loss is not None and len(trims) >= 2 * 2 + 2
    assert not decoder._forward_hooks
    model.eval().generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(torch.equal(m.weight.quant_state.absmax, before) for m, before in zip(layers, absmax_before))
