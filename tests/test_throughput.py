"""Throughput: the FLOPs formula (by hand and against torch's FLOP counter), the GPU peak table, the
benchmark's throughput cases, and that padding-free / packed rows never attend to one another."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import OPENMATH_SAMPLE, ROOT

ARITH_MODEL = ROOT / "models" / "Qwen3-arith-1M"  # trained: its loss depends on the context it sees
# A decoder small enough to count by hand: 1 layer, hidden 4, 2 query heads and 1 key/value head of dim 2.
HAND_CONFIG = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=2, vocab_size=10)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----- the FLOPs formula --------------------------------------------------------------------------------

def test_training_flops_by_hand():
    from qlora.planner.throughput import training_flops

    # projections (in x out): q 4x4, k 4x2, v 4x2, o 4x4, gate 4x8, up 4x8, down 8x4 -> P = 144 weights;
    # head 10x4 -> H = 40; LoRA r=1 on q_proj only: A = 1*(4+4) = 8. One row of n = 3 tokens.
    # causal attention forward: 2 matmuls x 2 FLOPs x 2 heads x dim 2 x (1+2+3) key positions = 96
    flops = training_flops(HAND_CONFIG, [3], lora_r=1, targets=["q_proj"], gradient_checkpointing=True)
    assert flops.forward == 2 * 3 * (144 + 40 + 8) + 96 == 1248
    # input gradients of every matmul 2n(P+H+A), LoRA weight gradients 2nA, attention backward 2 x 96
    assert flops.backward == 2 * 3 * (144 + 40 + 8) + 2 * 3 * 8 + 2 * 96 == 1392
    # the decoder layer's forward again (not the head): 2n(P+A) + 96
    assert flops.recompute == 2 * 3 * (144 + 8) + 96 == 1008
    assert flops.total == 3648 and flops.tokens == 3
    # n(6P + 4H + 8A) + 4 x attention: the closed form in the docstring
    assert flops.total == 3 * (6 * 144 + 4 * 40 + 8 * 8) + 4 * 96

    no_checkpointing = training_flops(HAND_CONFIG, [3], 1, ["q_proj"], gradient_checkpointing=False)
    assert no_checkpointing.recompute == 0 and no_checkpointing.total == 1248 + 1392
    # full fine-tuning: weight gradients of the projections and the head too; no LoRA
    full = training_flops(HAND_CONFIG, [3], None, TARGETS, gradient_checkpointing=False, full=True)
    assert full.forward == 2 * 3 * 184 + 96 and full.backward == 2 * (2 * 3 * 184) + 2 * 96
    # rows attend only to themselves: two rows of 3 cost twice one row of 3, not one row of 6
    two_rows = training_flops(HAND_CONFIG, [3, 3], 1, ["q_proj"], True)
    assert two_rows.total == 2 * flops.total
    assert training_flops(HAND_CONFIG, [6], 1, ["q_proj"], True).total > two_rows.total


def _count_matmuls(model, input_ids, backward: bool) -> dict[str, int]:
    """FLOPs that torch's counter attributes to the matmuls of a forward (and backward): linear layers
    (mm/addmm) apart from attention's batched matmuls (bmm, eager attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=input_ids, labels=input_ids)
        if backward:
            out.loss.backward()
    by_op = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"linear": by_op.get("mm", 0) + by_op.get("addmm", 0), "attention": by_op.get("bmm", 0),
            "other": sum(n for op, n in by_op.items() if op not in ("mm", "addmm", "bmm"))}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_flops_match_torch_flop_counter(checkpointing):
    """A tiny Qwen3 with LoRA on all 7 projections, eager attention, one row of 12 tokens, a full training
    step under torch.utils.flop_counter: its matmul FLOPs equal the formula's. Eager attention multiplies
    the whole n x n score matrix (the mask is applied after), so its attention is 2n/(n+1) of the causal count."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.model.fixtures import TINY_DIMENSIONS
    from qlora.planner.throughput import causal_attention_flops, matmul_parameters, training_flops

    dims = {**TINY_DIMENSIONS, "vocab_size": 96}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **dims), dtype=torch.float32,
                                             attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    model.enable_input_require_grads()  # as k-bit preparation does: every layer's input gradient is computed
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = 12
    counted = _count_matmuls(model, torch.randint(0, 96, (1, n)), backward=True)

    flops = training_flops(dims, [n], 4, TARGETS, gradient_checkpointing=checkpointing)
    attention_passes = 4 if checkpointing else 3  # forward, backward (2x), recompute
    attention = causal_attention_flops(dims, n) * attention_passes
    # torch's non-reentrant checkpoint stops recomputing once every saved tensor is back, so each layer's
    # last matmul (down_proj's LoRA B: nothing saves its output) is not run again: 2n * r * hidden per layer
    early_stop = 2 * n * 4 * dims["hidden_size"] * dims["num_hidden_layers"] if checkpointing else 0
    assert counted["linear"] == flops.total - attention - early_stop
    assert counted["attention"] == attention * 2 * n // (n + 1)
    assert counted["other"] == 0
    params = matmul_parameters(dims, 4, TARGETS)
    assert params["lora"] == sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def test_peak_table_and_utilization():
    from qlora.planner.throughput import PEAK_BF16_TFLOPS, model_flops_utilization, peak_bf16_tflops

    # names as torch.cuda.get_device_name reports them
    assert peak_bf16_tflops("NVIDIA H200") == 989.5
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert peak_bf16_tflops("NVIDIA H200 NVL") == 835.5 and peak_bf16_tflops("NVIDIA H100 NVL") == 835.5
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None and peak_bf16_tflops(None) is None
    assert all(source.startswith("NVIDIA") for _, _, source in PEAK_BF16_TFLOPS)
    assert model_flops_utilization(989.5e12, 2.0, "NVIDIA H200") == pytest.approx(0.5)
    assert model_flops_utilization(1e12, 1.0, None) is None  # CPU: no utilization against a guessed peak


# ----- the benchmark's throughput cases -----------------------------------------------------------------

def test_throughput_cases_configure_the_levers_they_name():
    from qlora.bench.cases import CASE_GROUPS, CASES_BY_NAME, case_config, row_count

    cases = {name: CASES_BY_NAME[name] for name in CASE_GROUPS["throughput"]}
    assert set(cases) >= {"trl_docs_qlora", "qlora", "qlora_b4_padding_free", "qlora_packed", "qlora_liger",
                          "qlora_offload", "qlora_b1_ga4", "qlora_b4_ga1", "unsloth_qlora"}
    # the larger micro-batch keeps the effective batch (the benchmark counts optimizer steps)
    small, large = cases["qlora_b1_ga4"], cases["qlora_b4_ga1"]
    assert (small.batch * small.accumulation, large.batch * large.accumulation) == (4, 4)
    cfg = case_config(small, seq=2048, batch=1, rank=256, steps=4)
    assert (cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"]) == (1, 4)
    assert (cfg["lora_r"], cfg["max_seq_length"], cfg["max_steps"], cfg["logging_steps"]) == (256, 2048, 4, 1)
    # the project's cases run 01_Train.py's constants: only the levers differ
    from qlora.config import training_defaults

    defaults = training_defaults()
    base = case_config(cases["qlora"], 2048, 1, 256, 4)
    assert base["optim"] == defaults["optim"] and base["packing"] is False and base["packing"] == defaults["packing"]
    assert case_config(cases["qlora_packed"], 2048, 1, 256, 4)["packing"] is True
    assert row_count(cases["qlora_packed"], 4, 1) > row_count(cases["qlora"], 4, 1)
    assert cases["qlora_offload"].activation_offloading and cases["qlora_liger"].liger
    assert cases["unsloth_qlora"].recipe == "unsloth" and cases["trl_docs_qlora"].recipe == "trl_docs"


def test_cases_that_cannot_run_here_are_skipped_with_the_reason(tmp_path):
    import torch

    from qlora.bench.cases import CASES_BY_NAME, skip_reason

    if torch.cuda.is_available():
        pytest.skip("the reasons below are the CPU ones")
    assert "CUDA" in skip_reason(CASES_BY_NAME["qlora_liger"])
    assert "CUDA" in skip_reason(CASES_BY_NAME["qlora_offload"])
    assert "CUDA" in skip_reason(CASES_BY_NAME["unsloth_qlora"], str(tmp_path))
    assert skip_reason(CASES_BY_NAME["qlora_packed"]) is None and skip_reason(CASES_BY_NAME["qlora"]) is None


def test_activation_offloading_needs_an_accelerator_in_trl():
    """Why the offloading case is skipped on CPU: TRL's offloading context asks for the current accelerator."""
    import torch
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(AttributeError):
        get_act_offloading_ctx_manager(torch.nn.Linear(2, 2))


def test_row_lengths_of_padded_padding_free_and_packed_batches():
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora.bench.worker import row_lengths

    examples = [{"input_ids": list(range(1, 6))}, {"input_ids": [7, 8]}, {"input_ids": [9, 10, 11]}]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert row_lengths(padded) == row_lengths(flat) == [5, 2, 3]
    assert flat["input_ids"].shape == (1, 10) and "attention_mask" not in flat
    assert row_lengths({"input_ids": torch.zeros(2, 7)}) == [7, 7]


def test_benchmark_case_groups_and_bad_model_dir(tmp_path):
    from conftest import run_python

    result = run_python(f"from tools.benchmark import main; main(['--cases=throughput,nope', '--work-dir={tmp_path}'])")
    assert result.returncode == 2 and "unknown case(s) nope;" in result.stderr
    result = run_python(f"from tools.benchmark import main; main(['--model={tmp_path}', '--work-dir={tmp_path}'])")
    assert result.returncode == 2 and "no config.json there" in result.stderr


# ----- padding-free and packed rows stay apart ----------------------------------------------------------

def _mixed_length_rows(count: int):
    """The first `count` sample rows as the project's SFT rows, row i's solution said 1 + i % 3 times: mixed
    lengths (the sample rows alone are all of one length with the demo's tokenizer)."""
    from qlora.data.formats import load_rows, to_sft_dataset

    def repeat(row, i):
        (message,) = row["completion"]
        return {"completion": [{**message, "content": " ".join([message["content"]] * (1 + i % 3))}]}

    return to_sft_dataset(load_rows("openmath", OPENMATH_SAMPLE, count), "openmath").map(repeat, with_indices=True)


def _token_rows(tokenizer, count: int) -> list[list[int]]:
    """Token ids of `count` mixed-length rows as chat texts."""
    texts = [tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
             for row in _mixed_length_rows(count)]
    return [tokenizer(text)["input_ids"] for text in texts]


def _next_token_nll(model, **inputs):
    import torch

    logits = model(**inputs).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, inputs["input_ids"][0, 1:], reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_rows_do_not_attend_to_each_other(attention):
    """The demo's trained base model, fp32. TRL's padding-free collator flattens 4 rows into one with
    position ids restarting at each row; with use_cache=False (what SFTTrainer.compute_loss passes) every
    token's loss equals the loss of the same token in its row run alone: transformers turns the restarts
    into a block-diagonal mask. Controls, each far off: the model config's default use_cache=True (a cache
    turns transformers' packed-row detection off), and running positions (nothing marks the rows)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(ARITH_MODEL)
    model = AutoModelForCausalLM.from_pretrained(ARITH_MODEL, dtype=torch.float32, attn_implementation=attention).eval()
    rows = _token_rows(tokenizer, 4)
    assert len({len(r) for r in rows}) > 1 and model.config.use_cache
    with torch.no_grad():
        alone = torch.cat([_next_token_nll(model, input_ids=torch.tensor([r])) for r in rows])
        batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
            [{"input_ids": r} for r in rows])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "seq_idx")}
        flat = _next_token_nll(model, **inputs, use_cache=False)
        cached = _next_token_nll(model, **inputs)
        running = _next_token_nll(model, input_ids=batch["input_ids"], use_cache=False,
                                  position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    starts = (batch["position_ids"][0, 1:] == 0)  # the prediction of a row's first token from the row before
    assert int(starts.sum()) == len(rows) - 1
    assert bool((batch["labels"][0, 1:][starts] == -100).all())  # and the collator takes it out of the loss
    assert torch.allclose(flat[~starts], alone, atol=2e-4), (flat[~starts] - alone).abs().max()
    assert (cached[~starts] - alone).abs().max() > 0.05
    assert (running[~starts] - alone).abs().max() > 0.05


def test_padding_free_training_losses_equal_the_padded_run(tmp_path):
    """The project's trainer (qlora.train.trainer.build_trainer as 01_Train.py calls it), LoRA on the demo's
    trained base (bf16: the 4-bit weights change nothing in how rows are batched or masked, and cost
    minutes on CPU), mixed-length rows in batches of 4, same seed: per-step losses with padding_free=True
    equal the padded run's within bf16 noise."""
    from qlora.config import training_defaults
    from qlora.model.loading import load_causal_lm, load_tokenizer
    from qlora.train.trainer import build_trainer
    from qlora.train.peft import prepare_for_training

    cfg = {**training_defaults(), "lora_r": 8, "max_steps": 2, "per_device_train_batch_size": 4,
           "gradient_accumulation_steps": 1, "logging_steps": 1, "max_seq_length": 512, "learning_rate": 1e-3,
           "QUANT_METHOD": "NONE", "optim": "adamw_torch"}
    data = _mixed_length_rows(8)
    losses = {}
    for padding_free in (False, True):
        model = prepare_for_training(load_causal_lm(str(ARITH_MODEL), None, "cpu"), cfg, quantized=False)
        levers = {"padding_free": True, "max_length": None} if padding_free else {}
        trainer = build_trainer(model, load_tokenizer(str(ARITH_MODEL)), cfg, data, None, tmp_path / str(padding_free),
                                "cpu", save_strategy="no", **levers)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("position_ids" in batch and "attention_mask" not in batch) == padding_free
        assert padding_free or 0 < int((batch["attention_mask"] == 0).sum())  # the padded run does pad
        trainer.train()
        losses[padding_free] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses[True]) == 2 and losses[False][1] < losses[False][0]
    assert losses[True] == pytest.approx(losses[False], rel=3e-3)


def test_packing_constant_packs_rows_padding_free_within_max_seq_length(tiny_model_dir, tmp_path):
    """packing=True (01_Train.py's constant) through qlora.train.trainer: rows packed best-fit into rows of at
    most max_seq_length tokens, each batch padding-free with positions restarting at every packed row."""
    from qlora.config import training_defaults
    from qlora.data.formats import load_rows, to_sft_dataset
    from qlora.model.loading import load_causal_lm, load_tokenizer
    from qlora.train.trainer import build_trainer
    from qlora.train.peft import prepare_for_training

    cfg = {**training_defaults(), "lora_r": 8, "max_steps": 1, "per_device_train_batch_size": 1,
           "gradient_accumulation_steps": 1, "max_seq_length": 256, "packing": True, "QUANT_METHOD": "NONE",
           "gradient_checkpointing": False}
    data = to_sft_dataset(load_rows("openmath", OPENMATH_SAMPLE, 12), "openmath")
    model = prepare_for_training(load_causal_lm(str(tiny_model_dir), None, "cpu"), cfg, quantized=False)
    trainer = build_trainer(model, load_tokenizer(str(tiny_model_dir)), cfg, data, None, tmp_path, "cpu",
                            save_strategy="no")
    assert trainer.args.packing and trainer.args.padding_free is False and trainer.padding_free
    assert len(trainer.train_dataset) < len(data)
    batches = list(trainer.get_train_dataloader())
    rows_per_batch = [int((b["position_ids"][0] == 0).sum()) for b in batches]
    assert all("attention_mask" not in b and b["input_ids"].shape[1] <= 256 for b in batches)
    assert max(rows_per_batch) > 1 and sum(rows_per_batch) == len(data)


# ----- the GPU script's logic, on CPU -------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_throughput_script_dry_run(tmp_path):
    """gpu/throughput_check.sh --dry-run: every throughput case, 1 step on a tiny model on CPU (about
    5 minutes on a loaded 2-core machine): measured, or skipped with its reason; JSON and table written."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "gpu" / "throughput_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "throughput.json").read_text())
    from qlora.bench.cases import THROUGHPUT_CASES

    rows = {r["case"]["name"]: r for r in report["results"]}
    assert list(rows) == list(THROUGHPUT_CASES)
    for name, row in rows.items():
        assert "failed" not in row, (name, row.get("failed"))
        assert "skipped" in row or (row["tokens_per_s"] > 0 and math.isfinite(row["final_loss"])), name
    assert rows["qlora_b4_padding_free"]["losses"] == pytest.approx(rows["qlora_b4_padded"]["losses"], rel=2e-3)
    table = (tmp_path / "out" / "throughput.txt").read_text()
    assert "| qlora_packed |" in table and "goal >= 1.50x" in table


def test_wheel_trimming_drops_members_and_their_record_lines(tmp_path):
    """gpu/fetch_wheels.py trims bitsandbytes to the CUDA versions asked for (and unsloth's web UI) so the
    wheels fit what the device tool carries; pip installs the trimmed wheel with every file RECORD lists."""
    import zipfile

    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_wheels", ROOT / "gpu" / "fetch_wheels.py")
    fetch_wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_wheels)
    bitsandbytes_drop, pinned, trim_wheel = fetch_wheels.bitsandbytes_drop, fetch_wheels.pinned, fetch_wheels.trim_wheel

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl"
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda118.so", "libbitsandbytes_cuda130.so"]
    members = {"bitsandbytes/__init__.py": b"x = 1\n", **{f"bitsandbytes/{lib}": b"\0" * 4096 for lib in libs}}
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in members.items())
    with zipfile.ZipFile(wheel, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)
        out.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record + "bitsandbytes-0.50.2.dist-info/RECORD,,\n")
    saved = trim_wheel(wheel, bitsandbytes_drop(["130"]))
    with zipfile.ZipFile(wheel) as trimmed:
        names = set(trimmed.namelist())
        record_lines = trimmed.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert "bitsandbytes/libbitsandbytes_cuda118.so" not in names and saved > 0
    assert {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
            "bitsandbytes/__init__.py"} <= names
    assert "cuda118" not in record_lines and "cuda130" in record_lines
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# pins\ntrl==1.16.0\ntrl-extra==2.0\n")
    assert pinned("trl", requirements) == "trl==1.16.0" and pinned("peft", requirements) == "peft"
