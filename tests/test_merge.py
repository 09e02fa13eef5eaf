"""The verified merge: candidates measured against the trained model, the kept artifact true to its
metadata, and every artifact kind reloaded in a fresh process giving the logits recorded at save time."""

import json
import math

import pytest
from safetensors import safe_open

from qlora.core.errors import ConfigError
from qlora.config import validate_config
from conftest import FAST_TRAIN_ARGS, run_python, train_on_openmath_sample

# Fewer steps than the end-to-end test: the merge does not need a converged adapter, only a trained one.
MERGE_TRAIN_ARGS = [*FAST_TRAIN_ARGS, "--max_steps=3", "--eval_samples=8", "--max_train_samples=60"]
NF4_NAME = "Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headfp16"
ADAPTER_NAME = "Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16"


def _train(tiny_model_dir, out, *extra):
    return train_on_openmath_sample(tiny_model_dir, out, *MERGE_TRAIN_ARGS, *extra)


@pytest.fixture(scope="module")
def nf4_run(tiny_model_dir, tmp_path_factory):
    """merge_base=auto (both bases checked), kept one re-quantized to NF4, lm_head kept in fp16.

    The threshold sits between the dequantized merge (KL ~5e-7 here) and NF4 re-quantization (~3e-4
    to 1.4e-3 measured): the run must flag the NF4 merge and keep the adapter primary."""
    out = tmp_path_factory.mktemp("merge_nf4")
    result = _train(tiny_model_dir, out, "--merge_base=auto", "--merged_precision=nf4", "--keep_lm_head_fp16=true",
                    "--merge_check_max_kl=1e-4")
    directory = out / NF4_NAME
    return directory, json.loads((directory / "metadata.json").read_text()), result


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge_adapter_only")
    _train(tiny_model_dir, out, "--merge_after_train=false", "--max_steps=1")
    directory = out / ADAPTER_NAME
    return directory, json.loads((directory / "metadata.json").read_text())


def _bf16_rounding(logit_scale: float) -> float:
    """One bf16 unit in the last place at the largest logit's magnitude (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(logit_scale, 1e-30))) - 7)


def test_dequantized_merge_is_the_trained_function(nf4_run):
    _, meta, _ = nf4_run
    deq = meta["merge_check"]["candidates"]["dequantized"]
    assert deq["tokens"] > 100
    assert deq["mean_kl"] < 1e-3
    assert deq["max_abs_logit_diff"] <= 2 * _bf16_rounding(deq["max_abs_logit"])
    assert abs(deq["loss"] - meta["merge_check"]["trained_loss"]) < 1e-2


def test_merge_above_the_threshold_is_loud_and_keeps_the_adapter_primary(nf4_run):
    _, meta, result = nf4_run
    check = meta["merge_check"]
    assert check["max_kl"] == 1e-4 and check["mean_kl"] > 1e-4 and check["passed"] is False
    assert "MERGE CHECK FAILED" in result.stderr and "adapter (adapter/, on the 4-bit base) is the primary" in result.stderr
    assert meta["artifact"]["primary"] == "adapter" and check["primary_artifact"] == "adapter"
    assert set(meta["artifact"]["fingerprints"]) == {"merged", "adapter"}


def test_every_candidate_is_measured_and_nf4_is_further_away(nf4_run):
    _, meta, result = nf4_run
    check = meta["merge_check"]
    candidates = check["candidates"]
    assert set(candidates) == {"dequantized", "original", "nf4"}
    for name, figures in candidates.items():
        assert set(figures) >= {"max_abs_logit_diff", "mean_kl", "loss", "tokens"}
        assert f"merge    | {name}" in result.stderr or name == "nf4"
    assert candidates["nf4"]["mean_kl"] > candidates["dequantized"]["mean_kl"]
    assert candidates["nf4"]["max_abs_logit_diff"] > candidates["dequantized"]["max_abs_logit_diff"]
    assert check["chosen_base"] == min(("dequantized", "original"), key=lambda b: candidates[b]["mean_kl"])
    assert check["artifact_candidate"] == "nf4" and check["mean_kl"] == candidates["nf4"]["mean_kl"]
    assert check["passed"] == (check["mean_kl"] <= check["max_kl"])
    assert meta["artifact"]["merge_base"] == check["chosen_base"]


def test_nf4_artifact_is_4bit_on_disk_with_an_fp16_head(nf4_run):
    directory, meta, _ = nf4_run
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes["lm_head.weight"] == "F16"  # untied from the bf16 embedding, saved in fp16
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "U8"  # packed 4-bit
    assert any(key.endswith("quant_state.bitsandbytes__nf4") for key in dtypes)
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert meta["artifact"]["kind"] == "merged_nf4" and meta["artifact"]["weights_bits"] == 4
    assert meta["quantization"]["weights_bits"] == 4 and meta["quantization"]["lm_head_dtype"] == "fp16"
    assert meta["artifact"]["lm_head_dtype"] == "fp16" and directory.name.endswith("_headfp16")
    assert not list(directory.glob(".merge-*"))  # candidate directories cleaned up


def test_adapter_only_directory(adapter_run):
    directory, meta = adapter_run
    assert (directory / "adapter" / "adapter_model.safetensors").exists()
    assert not (directory / "model.safetensors").exists()
    assert meta["artifact"]["kind"] == "adapter_only" and meta["artifact"]["primary"] == "adapter"
    assert meta["merge_check"] is None and meta["quantization"]["extras"]["merge_after_train"] is False
    assert meta["generation_check"]["prompts"] == 8  # run on the adapter, the primary artifact


def test_artifacts_reload_in_a_fresh_process_with_the_recorded_logits(nf4_run, adapter_run):
    """The merged NF4 model (through the loader that restores its fp16 head) and the adapter-only
    directory (through load_output_dir: PeftModel on the 4-bit base of the same plan)."""
    code = f"""
import json
from qlora.checks.logits import fingerprint_difference, logits_fingerprint
from qlora.model.loading import load_merged_dir; from qlora.outputs.read import load_output_dir
def report(model, recorded):
    print("RESULT", json.dumps([type(model).__name__, str(model.get_output_embeddings().weight.dtype),
                                fingerprint_difference(recorded, logits_fingerprint(model, recorded["input_ids"]))]))
nf4_dir, adapter_dir = {[str(nf4_run[0]), str(adapter_run[0])]!r}
meta = json.load(open(nf4_dir + "/metadata.json"))
report(load_merged_dir(nf4_dir), meta["artifact"]["fingerprints"]["merged"])
model, tokenizer, meta = load_output_dir(adapter_dir)
report(model, meta["artifact"]["fingerprints"]["adapter"])
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line.split("RESULT", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RESULT")]
    (nf4_class, nf4_head, nf4_diff), (adapter_class, _, adapter_diff) = rows
    assert nf4_class == "Qwen3ForCausalLM" and nf4_head == "torch.float16" and nf4_diff == 0.0
    assert adapter_class == "PeftModelForCausalLM" and adapter_diff == 0.0


@pytest.mark.parametrize("override, message", [
    ({"merge_base": "peft"}, "merge_base='peft' is unknown; allowed: dequantized, original, auto"),
    ({"merged_precision": "int8"}, "merged_precision='int8' is unknown; allowed: bf16, nf4"),
    ({"merged_precision": "nf4", "merge_after_train": False}, "merged_precision=nf4 needs merge_after_train=True"),
    ({"merged_precision": "nf4", "QUANT_METHOD": "NONE"}, "merged_precision=nf4 needs merge_after_train=True and QUANT"),
    ({"eval_samples": 0}, "merge_after_train=True needs eval_samples > 0"),
])
def test_merge_settings_are_validated(override, message):
    from qlora.config import training_defaults

    cfg = training_defaults() | override
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(cfg)


def _peft_on_4bit(model_dir, targets=("q_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    from qlora.model.loading import load_causal_lm
    from quantization_utils import build_quantization_plan

    _, bnb = build_quantization_plan("QLORA")
    model = load_causal_lm(str(model_dir), bnb, "cpu")
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), init_lora_weights=False,
                                            task_type="CAUSAL_LM"))


def test_merge_frees_each_4bit_layer_and_keeps_no_second_copy(tiny_model_dir):
    """Layer by layer: once merged, no 4-bit weight or adapter survives, and the merged model lives only
    as long as its own references, even while the PeftModel object the caller holds is still alive."""
    import gc
    import weakref

    import bitsandbytes as bnb
    import torch

    from qlora.merge.weights import merge_lora

    model = _peft_on_4bit(tiny_model_dir)
    quantized = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    adapters = [weakref.ref(m.lora_A["default"].weight) for m in model.modules() if hasattr(m, "lora_A")]
    merged = merge_lora(model, "dequantized")
    gc.collect()
    assert quantized and adapters
    assert not any(ref() is not None for ref in quantized + adapters)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    merged_ref = weakref.ref(merged)
    del merged
    gc.collect()
    assert merged_ref() is None and model is not None


def test_original_base_is_the_checkpoint_weight_plus_the_adapter(tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from qlora.merge.weights import merge_lora

    model = _peft_on_4bit(tiny_model_dir)
    name = "model.layers.1.self_attn.q_proj"
    delta = model.base_model.model.get_submodule(name).get_delta_weight("default").float()
    untargeted = "model.layers.0.mlp.up_proj"  # no adapter: plain original weight
    merged = merge_lora(model, "original", str(tiny_model_dir))
    checkpoint = load_file(str(tiny_model_dir / "model.safetensors"))
    expected = (checkpoint[f"{name}.weight"].float() + delta).to(torch.bfloat16)
    assert torch.equal(merged.get_submodule(name).weight, expected)
    assert torch.equal(merged.get_submodule(untargeted).weight, checkpoint[f"{untargeted}.weight"])


def test_merge_leaves_non_persistent_buffers_as_every_load_computes_them(tiny_model_dir):
    """Rotary inv_freq is not saved; every load computes it in fp32. The merged model keeps it so: cast to
    bf16 it moved the reloaded logits away from those measured before saving."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.merge.weights import merge_lora

    merged = merge_lora(_peft_on_4bit(tiny_model_dir), "dequantized")
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert merged.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(merged.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


def _tensors(directory):
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize("model_type, options", [
    ("qwen3", {"base": "dequantized", "head": None}),
    ("llama", {"base": "original", "head": "fp16", "dora": True}),
    ("gemma3_text", {"base": "dequantized", "head": "fp16"}),
    ("mistral", {"base": "original", "head": None}),
])
def test_streamed_merge_writes_what_the_in_memory_merge_saves(model_type, options, tmp_path):
    """The streamed merge (one tensor at a time into safetensors) and merge_lora + save_pretrained give the same
    files: the same tensor names, dtypes and bits, and the same config, on each family (tied and untied heads,
    DoRA, both merge bases, the fp16 head)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora.merge.weights import merge_lora, write_merged
    from qlora.model.fixtures import build_random_model, tokenizer_corpus, train_bpe_tokenizer
    from qlora.model.loading import load_causal_lm, set_lm_head_dtype
    from quantization_utils import build_quantization_plan

    source = tmp_path / model_type
    build_random_model(source, train_bpe_tokenizer(tokenizer_corpus(20), 300), model_type=model_type,
                       tie_word_embeddings=model_type in ("qwen3", "gemma3_text"))
    head = torch.float16 if options["head"] else None
    _, bnb = build_quantization_plan("QLORA")

    def trained():
        torch.manual_seed(0)
        model = load_causal_lm(str(source), bnb, "cpu")
        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False, use_dora=options.get("dora", False)))

    write_merged(trained(), tmp_path / "streamed", options["base"], str(source), head_dtype=head)
    merged = merge_lora(trained(), options["base"], str(source))
    if head is not None:
        set_lm_head_dtype(merged, head)
    merged.save_pretrained(tmp_path / "in_memory")
    streamed, in_memory = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "in_memory")
    assert streamed.keys() == in_memory.keys()
    assert all(streamed[k].dtype == in_memory[k].dtype and torch.equal(streamed[k], in_memory[k]) for k in streamed)
    assert (json.loads((tmp_path / "streamed" / "config.json").read_text())
            == json.loads((tmp_path / "in_memory" / "config.json").read_text()))
    assert ("lm_head.weight" in streamed) == (head is not None or model_type in ("llama", "mistral"))


def test_streamed_merge_shards_like_the_hub_and_transformers_loads_them(tiny_model_dir, tmp_path):
    """Shards named and indexed as the hub writes them: from_pretrained loads the same model as from one file."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.core.shards import INDEX_FILE
    from qlora.merge.weights import write_merged

    torch.manual_seed(0)
    write_merged(_peft_on_4bit(tiny_model_dir), tmp_path / "one", "dequantized")
    torch.manual_seed(0)
    files = write_merged(_peft_on_4bit(tiny_model_dir), tmp_path / "sharded", "dequantized", shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert files == shards + [INDEX_FILE]
    single = tmp_path / "one" / "model.safetensors"
    assert index["metadata"]["total_size"] == single.stat().st_size - _header_bytes(single)
    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one"))
    sharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    assert torch.equal(one(ids).logits, sharded(ids).logits)


def _header_bytes(path) -> int:
    import struct

    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_merge_check_tells_rounding_from_a_wrong_merge(tiny_model_dir, tmp_path):
    """The rounding floor is measured on the trained model (its decoder weights re-rounded by one bf16 step); a
    correct merge sits near it and passes; the same merge with the delta dropped, or with twice its scale, is far
    above it and fails, even with merge_check_max_kl at 0. The trained logits are read back from files."""
    from qlora.checks.logits import kl_limit, measure_candidate, tokenize_for_check, trained_reference
    from qlora.merge.weights import write_merged
    from qlora.model.loading import load_merged_dir, load_tokenizer

    model = _peft_on_4bit(tiny_model_dir, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [{"text": f"problem {i}: what is {i} plus {2 * i}? the answer is {3 * i}."} for i in range(4)]
    batches = tokenize_for_check(tokenizer, rows, 64)
    trained, _, floor = trained_reference(model, batches, tmp_path / "reference")
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == len(batches) == len(trained)
    figures = {}
    for name, scale in (("correct", 1.0), ("delta dropped", 0.0), ("twice the scale", 2.0)):
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                module._true_scaling = getattr(module, "_true_scaling", module.scaling["default"])
                module.scaling["default"] = module._true_scaling * scale
        write_merged(model, tmp_path / name, "dequantized")
        figures[name] = measure_candidate(load_merged_dir(tmp_path / name, device="cpu"), trained, batches)
    assert 0 < floor and figures["correct"]["mean_kl"] <= kl_limit(floor, 0.0)
    for wrong in ("delta dropped", "twice the scale"):
        assert figures[wrong]["mean_kl"] > kl_limit(floor, 0.0), (wrong, figures[wrong], floor)
        assert figures[wrong]["mean_kl"] > 10 * figures["correct"]["mean_kl"]


def test_merge_check_reloads_within_a_budget_through_offloading(tiny_model_dir, tmp_path):
    """A merged checkpoint larger than the memory left is loaded by accelerate's offloading: the same logits."""
    import torch

    from qlora.checks.logits import logits_on
    from qlora.merge.weights import write_merged
    from qlora.model.loading import load_merged_dir

    write_merged(_peft_on_4bit(tiny_model_dir), tmp_path, "dequantized")
    whole = load_merged_dir(tmp_path, device="cpu")
    offloaded = load_merged_dir(tmp_path, device="cpu", budget_bytes=50_000)
    assert "disk" in set(offloaded.hf_device_map.values())
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # layers left in the files
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(logits_on(whole, [batch])[0], logits_on(offloaded, [batch])[0])


@pytest.mark.parametrize("model_type, options", [
    ("qwen3", {}), ("llama", {}), ("mistral", {}),
    ("gemma3_text", {"final_logit_softcapping": 30.0}),  # the softcap is applied after each chunk of the head
    ("olmo", {}),  # outside HEAD_ONLY_FAMILIES: chunks of the whole row's logits
])
def test_logits_a_chunk_at_a_time_are_the_forwards_logits(model_type, options, tmp_path):
    """The merge check takes a candidate's logits a chunk of positions at a time (the decoder once, the head per
    chunk): bit for bit the logits of the model's own forward, whole or offloaded."""
    import torch

    from qlora.checks.logits import logit_chunks, logits_on
    from qlora.model.fixtures import build_random_model, tokenizer_corpus, train_bpe_tokenizer
    from qlora.model.loading import load_merged_dir

    build_random_model(tmp_path, train_bpe_tokenizer(tokenizer_corpus(20), 300), model_type=model_type, **options)
    ids = torch.randint(0, 300, (1, 37), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for budget in (None, 50_000):
        model = load_merged_dir(tmp_path, device="cpu", budget_bytes=budget)
        (whole,) = logits_on(model, [batch])
        chunks = list(logit_chunks(model, batch, chunk=8))
        assert [start for start, _ in chunks] == [0, 8, 16, 24, 32]
        assert torch.equal(torch.cat([logits for _, logits in chunks]), whole[0]), (model_type, budget)


def test_reading_a_repacked_4bit_weight_leaves_the_layer_as_it_was(tiny_model_dir):
    """On CPUs where bitsandbytes repacks 4-bit weights at the first inference forward, the rounding floor reads
    each weight (keep_layout) without unpacking it for good; the merge's read afterwards is unchanged by it."""
    import torch

    from qlora.model.base_weights import dense_weight

    model = _peft_on_4bit(tiny_model_dir).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    first = dense_weight(layer, keep_layout=True)
    assert torch.equal(dense_weight(layer, keep_layout=True), first)
    assert torch.equal(dense_weight(layer), first)
