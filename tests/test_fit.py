"""Will it fit: the plan decides before any weights load. The dry run, the refusal of a run over its memory
limit (with the changes that would fit), tools/plan.py's table, and the planner on the shipped Gemma, Llama and
Mistral configs (counts checked against the models transformers builds from them)."""

import json
import re

import pytest

from conftest import OPENMATH_SAMPLE, run_train

TINY_RUN = ["--max_steps=2", "--max_seq_length=128", "--eval_samples=8", "--max_train_samples=64", "--lora_r=8"]


def test_dry_run_prints_the_plan_and_loads_no_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
                        "--dry_run=true", *TINY_RUN])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-2000:]
    for part in ("dry run  | data: 64 training rows", "dry run  | training: predicted peak RSS",
                 "dry run  | merge:", "dry run  | disk:", "fits in", "no weights loaded, nothing written"):
        assert part in log
    assert not re.search(r"^\S+ model\s+\|", log, re.M)  # the model step never ran
    assert not out.exists()  # no output directory claimed or created


def test_run_over_its_memory_limit_is_refused_in_one_line_before_loading(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
                        "--memory_limit_gb=0.01", *TINY_RUN])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "exceeds 0.01 GiB (memory_limit_gb=0.01)" in errors[0]
    # the tiny model's peak is the CPU runtime itself: no change fits, the largest cuts are listed with their peaks
    assert "no single change fits" in errors[0]
    assert len(re.findall(r"->\S+: \d+\.\d\d GiB", errors[0])) >= 2
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_levers_are_replanned_configs_that_fit():
    """Each lever is the planner run again on the changed constants: its peak is that plan's, under the budget."""
    from qlora.config import training_defaults
    from qlora.core.memory import GIB
    from qlora.planner.memory import fitting_levers, plan_for_train_config
    from qlora.model.fixtures import architecture

    model = architecture("Qwen3-8B")
    cfg = {**training_defaults(), "lora_r": 64, "max_seq_length": 512, "per_device_train_batch_size": 4,
           "gradient_accumulation_steps": 4, "gradient_checkpointing": False, "merge_after_train": False,
           "optim": "adamw_torch"}
    budget = 24 * GIB
    assert plan_for_train_config(model, cfg, "cuda")["peak_bytes"] > budget
    levers = fitting_levers(model, cfg, "cuda", budget)
    assert [text.split()[0] for text, _ in levers] == ["gradient_checkpointing", "per_device_train_batch_size",
                                                        "max_seq_length"]  # cheapest first
    assert levers[0] == ("gradient_checkpointing False->True",
                         plan_for_train_config(model, {**cfg, "gradient_checkpointing": True}, "cuda")["peak_bytes"])
    assert levers[1][0] == "per_device_train_batch_size 4->2 with gradient_accumulation_steps 4->8"  # same effective batch
    assert all(peak <= budget for _, peak in levers)


def test_full_fine_tuning_over_budget_with_fp32_weights_is_offered_bf16_weights():
    from qlora.config import training_defaults
    from qlora.planner.memory import fitting_levers, plan_for_train_config
    from qlora.model.fixtures import architecture

    model = architecture("Qwen3-1.7B")
    cfg = {**training_defaults(), "QUANT_METHOD": "NONE", "PEFT_CONFIG": "Full", "full_weights_dtype": "fp32",
           "max_seq_length": 512, "merge_after_train": False}
    fp32 = plan_for_train_config(model, cfg, "cuda")["peak_bytes"]
    bf16 = plan_for_train_config(model, {**cfg, "full_weights_dtype": "bf16"}, "cuda")["peak_bytes"]
    assert bf16 < fp32
    levers = dict(fitting_levers(model, cfg, "cuda", (bf16 + fp32) // 2))
    assert levers["full_weights_dtype fp32->bf16"] == bf16


@pytest.mark.parametrize("value,ok", [("auto", True), ("off", True), ("7.5", True), (12, True), ("0", False),
                                      ("-1", False), ("lots", False), ("nan", False), (None, False)])
def test_memory_limit_accepts_auto_off_or_gib(value, ok):
    from qlora.core.errors import ConfigError
    from qlora.planner.memory import parse_memory_limit

    if ok:
        parse_memory_limit(value)
    else:
        with pytest.raises(ConfigError, match="memory_limit_gb=.* is not auto, off or a number of GiB > 0"):
            parse_memory_limit(value)


def test_plan_tool_tabulates_what_fits_for_a_shipped_config(capsys):
    from qlora.core.memory import GIB
    from qlora.planner.memory import plan_for_train_config
    from qlora.model.fixtures import architecture
    from tools.plan import BUDGETS_GIB, main, train_config

    text = main(["--model", "Qwen3-8B", "--seq", "2048", "--r", "64"])
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row[0]) for row in rows] == list(BUDGETS_GIB)
    ranks = [None if row[3].strip() == "-" else int(row[3]) for row in rows]
    assert ranks[-1] is not None and ranks == sorted(ranks, key=lambda r: -1 if r is None else r)
    # a cell is the planner's answer: the largest rank fits the budget, the next one up does not
    args = type("Args", (), dict(r=64, seq=2048, batch=1, optim="paged_adamw_8bit", method="QLORA",
                                 gradient_checkpointing=True, merge=False))
    cfg = train_config(args)
    model = architecture("Qwen3-8B")
    budget, rank = BUDGETS_GIB[2], ranks[2]
    assert plan_for_train_config(model, {**cfg, "lora_r": rank}, "cuda")["peak_bytes"] <= budget * GIB
    assert plan_for_train_config(model, {**cfg, "lora_r": rank * 2}, "cuda")["peak_bytes"] > budget * GIB


@pytest.mark.parametrize("name", ["gemma-3-270m", "gemma-3-1b", "gemma-3-4b", "Llama-3.2-1B", "Llama-3.1-8B",
                                  "Mistral-7B-v0.3", "Qwen3-8B"])
def test_planner_counts_the_parameters_of_each_shipped_architecture(name):
    """Embedding, tying, head_dim, q/k norms and Gemma's four norms per layer: the planner's counts are those of
    the model transformers builds from the config (on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.planner.memory import parameter_counts
    from qlora.model.fixtures import MODEL_CONFIGS_DIR, architecture
    from qlora.model.loading import read_model_config

    config = architecture(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    counts = parameter_counts(config)
    assert sum(counts.values()) == model.num_parameters()
    assert counts["lm_head"] == (0 if config.get("tie_word_embeddings") else config["vocab_size"] * config["hidden_size"])
    assert "_source" in json.loads((MODEL_CONFIGS_DIR / f"{name}.json").read_text())  # the file says where it is from
    assert "_source" not in config and "_source" not in read_model_config(str(MODEL_CONFIGS_DIR / f"{name}.json"), 128)


def test_planner_on_a_gemma_config_counts_its_vocabulary_terms():
    """Gemma 3 (262k vocabulary, tied): the CPU loss tiles, the embedding's read and (with peft's upcast kept)
    the fp32 copies of k-bit preparation scale with the vocabulary."""
    from qlora.planner.memory import CPU_LOSS_TILES, TRL_VOCAB_CHUNK, TrainingSetup, plan_training_memory
    from qlora.model.fixtures import architecture

    gemma = architecture("gemma-3-270m")
    plan = plan_training_memory(gemma, TrainingSetup(lora_r=16, seq_len=512, device="cpu"))
    assert plan["parts"]["logits"] == int(CPU_LOSS_TILES * 511 * TRL_VOCAB_CHUNK * 4)  # a tile over glibc's heap limit
    embedding = 262144 * 640
    assert plan["params"]["embedding"] == embedding and plan["params"]["lm_head"] == 0
    assert plan["load_peak_bytes"] >= 4 * embedding  # the bf16 embedding held twice while it is read
    upcast = plan_training_memory(gemma, TrainingSetup(lora_r=16, seq_len=512, device="cpu", embeddings_dtype="fp32"))
    assert upcast["load_peak_bytes"] >= 6 * embedding  # peft's fp32 copy beside the bf16 embedding
    assert plan["params"]["norms"] == 18 * (4 * 640 + 2 * 256) + 640
    on_cuda = plan_training_memory(gemma, TrainingSetup(lora_r=16, seq_len=512, device="cuda"))
    assert on_cuda["parts"]["logits"] == 0  # TRL's Triton kernel folds each tile in place
