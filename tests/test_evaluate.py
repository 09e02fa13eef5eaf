"""tools/evaluate.py: detection of every artifact kind, split choice, and a real end-to-end run on a
tiny trained directory."""

import json

import pytest

from conftest import FAST_TRAIN_ARGS, OPENMATH_SAMPLE, run_train
from qlora.evaluation import DEFAULT_SPLIT, LoadKind, choose_splits, detect_load_kind, markdown_table
from tools.evaluate import main as evaluate

QLORA_BLOCK = {"method": "QLORA", "weights_bits": 4, "lm_head_dtype": "bf16", "backend": "bitsandbytes",
               "extras": {"double_quant": True, "base_quant_type": "nf4", "compute_dtype": "bfloat16", "lora_r": 8,
                          "merge_after_train": False}}
CONFIG = {"max_train_samples": 200, "eval_samples": 16}
DATASET = {"name": "openmath", "path": "samples/openmath_sample.jsonl", "eval_rows": 16, "split_seed": 42}


def _dir(tmp_path, name, metadata=None, config=True):
    path = tmp_path / name
    path.mkdir()
    if config:
        (path / "config.json").write_text("{}")
    if metadata is not None:
        (path / "metadata.json").write_text(json.dumps(metadata))
    return path


def test_detects_merged_qlora_as_bf16(tmp_path):
    meta = {"quantization": QLORA_BLOCK, "artifact": {"kind": "merged_bf16"}, "base_model": "b"}
    assert detect_load_kind(_dir(tmp_path, "m", meta), meta) == LoadKind("merged", "QLORA")


def test_detects_adapter_only_with_the_training_plan(tmp_path):
    meta = {"quantization": QLORA_BLOCK, "artifact": {"kind": "adapter_only", "adapter_dir": "adapter"},
            "base_model": "/models/Qwen3-0.6B"}
    plan = detect_load_kind(_dir(tmp_path, "a", meta, config=False), meta)
    assert plan.kind == "adapter" and plan.method == "QLORA" and plan.base_model == "/models/Qwen3-0.6B"
    assert dict(plan.quant_options) == {"double_quant": True, "base_quant_type": "nf4", "compute_dtype": "bfloat16"}
    flagged = {**meta, "artifact": {"kind": "merged_bf16", "primary": "adapter"}}
    assert detect_load_kind(tmp_path / "a", flagged).kind == "adapter"  # merge flagged: the adapter is the model
    nf4 = {**meta, "artifact": {"kind": "merged_nf4", "primary": "merged"}}
    assert detect_load_kind(tmp_path / "a", nf4).kind == "merged"


def test_detects_full_finetune_and_ptq_sibling(tmp_path):
    full = {"quantization": {"method": "NONE"}, "artifact": {"kind": "full_bf16"}}
    assert detect_load_kind(_dir(tmp_path, "f", full), full) == LoadKind("merged", "NONE")
    ptq = {"quantization": {"method": "BNB_NF4"}, "artifact": {"kind": "ptq", "merged": True}}
    assert detect_load_kind(_dir(tmp_path, "p", ptq), ptq) == LoadKind("ptq", "BNB_NF4")


def test_detects_by_name_without_metadata(tmp_path):
    assert detect_load_kind(_dir(tmp_path, "Qwen3-0.6B"), None) == LoadKind("base", "NONE")
    named = _dir(tmp_path, "Qwen3-0.6B-openmath_SFT_LoRa8_QLORA_w4_headbf16")
    assert detect_load_kind(named, None) == LoadKind("merged", "QLORA")
    with pytest.raises(ValueError, match="no metadata.json naming its base model"):
        detect_load_kind(_dir(tmp_path, "x_QLORA_w4", config=False), None)
    with pytest.raises(ValueError, match="neither an output directory"):
        detect_load_kind(_dir(tmp_path, "empty", config=False), None)


def test_unknown_artifact_kind_is_refused(tmp_path):
    meta = {"quantization": QLORA_BLOCK, "artifact": {"kind": "mystery"}}
    with pytest.raises(ValueError, match="artifact kind 'mystery'; known: merged_bf16"):
        detect_load_kind(_dir(tmp_path, "m", meta), meta)


def test_base_and_finetuned_share_the_training_split():
    trained = {"dataset": DATASET, "config": CONFIG}
    splits = choose_splits([None, trained], None, None)
    expected = {"name": "openmath", "path": DATASET["path"], "max_rows": 216, "eval_rows": 16, "seed": 42}
    assert splits == [expected, expected]
    # a PTQ sibling carries its source's config
    ptq = {"dataset": DATASET, "source": {"metadata": {"config": CONFIG}}}
    assert choose_splits([ptq], None, None) == [expected]
    # another dataset given: the default 01_Train.py split of it, for everyone
    other = choose_splits([None, trained], "squad", None)
    assert other == [{"name": "squad", "path": None, **DEFAULT_SPLIT}] * 2
    with pytest.raises(ValueError, match="pass --dataset"):
        choose_splits([None], None, None)


def test_bad_arguments_fail_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--limit must be a positive integer"):
        evaluate([str(tmp_path), "--limit=0"])
    with pytest.raises(SystemExit, match="is not a directory"):
        evaluate([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="unsupported extension"):
        evaluate([str(tmp_path), "--dataset=openmath", f"--dataset-path={tmp_path}/rows.txt"])


@pytest.fixture(scope="module")
def adapter_only_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_outputs")
    result = run_train([f"--MODEL_NAME={tiny_model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}",
                        "--merge_after_train=false", "--lora_r=8", *FAST_TRAIN_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    return next(out.iterdir())


def test_evaluate_end_to_end_on_base_and_adapter(adapter_only_run, tiny_model_dir, tmp_path):
    chart = tmp_path / "chart.png"
    results = evaluate([str(tiny_model_dir), str(adapter_only_run), "--limit=4", "--max-new-tokens=8",
                        f"--chart={chart}"])
    base, tuned = results
    assert (base["load_kind"], tuned["load_kind"], tuned["method"]) == ("base", "adapter", "QLORA")
    assert base["rows"] == tuned["rows"] == 4 and base["dataset"] == tuned["dataset"]
    assert tuned["dataset"]["eval_rows"] == 16 and tuned["dataset"]["seed"] == 42  # the training split
    # the 4-bit base really is 4-bit: its linear weights are stored in far fewer bytes than the bf16 base's
    assert tuned["weight_footprint"]["quantized_params"] > 0 and base["weight_footprint"]["quantized_params"] == 0
    assert base["weights_on_disk_bytes"] == sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert tuned["weights_on_disk_bytes"] is None  # an adapter's base lies elsewhere
    assert 0 <= tuned["accuracy"] <= 100 and tuned["heldout_loss"] > 0 and tuned["generated_tokens"] > 0
    on_disk = json.loads((adapter_only_run / "eval_results.json").read_text())
    assert on_disk["heldout_loss"] == tuned["heldout_loss"]
    assert on_disk["directory"] == str(adapter_only_run.resolve()) and on_disk["dataset"]["path"] == str(OPENMATH_SAMPLE)
    card = (adapter_only_run / "README.md").read_text()  # rendered again with the results
    assert "## Evaluation" in card and "loaded as adapter" in card and f"| {tuned['accuracy']:.4g} |" in card
    assert not (tiny_model_dir / "README.md").exists()  # a plain base model directory gets no card
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(results)
    assert table.count("\n") == 3 and adapter_only_run.name in table and "| accuracy |" in table
    assert "| in memory MB | on disk MB |" in table
    assert "| QLORA | LoRa8 | adapter on 4-bit base |" in table
