"""tools/quantize.py: PTQ siblings of a tiny model, reloaded in a fresh process and compared with the source.

bitsandbytes methods run here; the llmcompressor ones (marker `ptq`) run in the PTQ environment
(`bash scripts/setup_ptq.sh`, or $PTQ_PYTHON) and are skipped, saying so, when it is absent.
"""

import json
import shutil
import sys
from importlib.util import find_spec

import pytest
from ptq_support import OPENMATH_SAMPLE, check_texts, fresh_logits, ptq_python, run_quantize
from safetensors import safe_open

from conftest import SQUAD_SAMPLE
from qlora.checks.logits import compare_logits
from quantization_utils import build_metadata, build_quantization_plan
from tools.quantize import main as quantize_main

SOURCE_NAME = "Qwen3-0.6B-openmath_SFT_LoRa8_QLORA_w4_headbf16"
# Relative logit error bounds on the tiny random model (measured: INT8 ~0.011, NF4 ~0.11, W8A8 ~0.012,
# GPTQ w4g64 ~0.14); a corrupted or unquantized-by-mistake sibling is far off either way.
BOUNDS = {"BNB_INT8": 0.05, "BNB_NF4": 0.25, "GPTQ": 0.35, "W8A8": 0.05}


@pytest.fixture(scope="module")
def source(tiny_model_dir, tmp_path_factory):
    """The tiny model laid out like a 01_Train.py output: merged weights + metadata naming its dataset."""
    directory = tmp_path_factory.mktemp("src") / SOURCE_NAME
    shutil.copytree(tiny_model_dir, directory)
    spec, _ = build_quantization_plan("QLORA", lora_r=8, merge_after_train=True)
    metadata = build_metadata(spec, base_model="Qwen/Qwen3-0.6B", peft="LoRa8",
                              dataset={"name": "openmath", "path": str(OPENMATH_SAMPLE), "train_rows": 200,
                                       "eval_rows": 16, "split_seed": 42},
                              config={"max_train_samples": 200, "eval_samples": 16})
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


def sibling_logits(python, source, siblings, tmp_path):
    """The relative logit error of each sibling vs the source, all reloaded in one fresh process."""
    logits, batches = fresh_logits(python, [source, *siblings], check_texts(), tmp_path / "logits.pt")
    return {s: compare_logits(logits[source], logits[s], batches) for s in siblings}


def check_metadata(sibling, source, expected_quantization):
    meta = json.loads((sibling / "metadata.json").read_text())
    source_meta = json.loads((source / "metadata.json").read_text())
    quant = meta["quantization"]
    assert {k: quant[k] for k in expected_quantization} == expected_quantization
    assert meta["source"] == {"dir": str(source.resolve()), "metadata": source_meta}
    assert meta["base_model"] == "Qwen/Qwen3-0.6B" and meta["peft"] == "LoRa8"
    assert meta["artifact"]["weights_bytes"] == sum(f.stat().st_size for f in sibling.glob("*.safetensors"))
    check_quality(sibling, meta["quality"])
    return meta


def check_quality(sibling, quality):
    """Measured against the source on held-out rows, and shown in the sibling's card."""
    assert quality["rows"] == 8 and quality["tokens"] > 0 and "held-out rows of the source's training split" in quality["data"]
    assert 0 < quality["mean_kl"] < 0.05 and quality["max_abs_logit_diff"] > 0
    assert abs(quality["loss"] - quality["source_loss"]) < 0.1
    card = (sibling / "README.md").read_text()
    assert "## Quality against the 16-bit source" in card and f"Measured on {quality['tokens']} tokens" in card


# ----- bitsandbytes (main environment) ----------------------------------------------------------------

BNB_CASES = {
    "BNB_INT8": ("BNBINT8_w8_headbf16", {"weights_bits": 8, "backend": "bitsandbytes"}, "load_in_8bit", "int8", 8),
    "BNB_NF4": ("BNBNF4_w4_headbf16", {"weights_bits": 4, "backend": "bitsandbytes"}, "load_in_4bit", "uint8", 4),
}


@pytest.fixture(scope="module")
def bnb_siblings(source, tmp_path_factory):
    """Both bitsandbytes siblings (quantized through the CLI's main), and their logit checks."""
    out_root = tmp_path_factory.mktemp("bnb")
    siblings = {m: quantize_main(["--model", str(source), "--method", m, "--out-root", str(out_root)])
                for m in BNB_CASES}
    assert sorted(p.name for p in out_root.iterdir()) == sorted(p.name for p in siblings.values())  # no staging left
    checks = sibling_logits(sys.executable, source, list(siblings.values()), tmp_path_factory.mktemp("logits"))
    return out_root, {m: (sibling, checks[sibling]) for m, sibling in siblings.items()}


@pytest.mark.parametrize("method", BNB_CASES)
def test_bitsandbytes_sibling(method, source, bnb_siblings):
    tag, expected, flag, storage, bits = BNB_CASES[method]
    sibling, check = bnb_siblings[1][method]
    assert sibling.name == f"Qwen3-0.6B-openmath_SFT_LoRa8_{tag}"
    meta = check_metadata(sibling, source, {"method": method, "lm_head_dtype": "bf16", **expected})
    assert meta["quantization"]["extras"]["compute_dtype"] == "bfloat16"
    if method == "BNB_NF4":
        assert meta["quantization"]["extras"]["double_quant"] is True
    config = json.loads((sibling / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config[flag] is True
    with safe_open(sibling / "model.safetensors", "pt") as f:  # the projections really are stored quantized
        weight = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert str(weight.dtype) == f"torch.{storage}" and weight.numel() * 8 == 64 * 128 * bits
    assert check["relative_error"] < BOUNDS[method], check  # reloaded in a fresh process, close to the source


def test_existing_sibling_and_quantized_source_are_refused(source, bnb_siblings):
    out_root, siblings = bnb_siblings
    before = sorted(p.name for p in out_root.iterdir())
    with pytest.raises(SystemExit, match="exists; remove it"):
        quantize_main(["--model", str(source), "--method", "BNB_NF4", "--out-root", str(out_root)])
    with pytest.raises(SystemExit, match=r"is already quantized \(bitsandbytes\)"):
        quantize_main(["--model", str(siblings["BNB_NF4"][0]), "--method", "BNB_INT8", "--out-root", str(out_root)])
    assert sorted(p.name for p in out_root.iterdir()) == before


# ----- bad input: one line, nothing written ----------------------------------------------------------------

BAD_INPUT = {
    "missing dir": (["--model", "{tmp}/nope", "--method", "BNB_NF4"], "does not exist"),
    "no model": (["--model", "{empty}", "--method", "BNB_NF4"], "holds no model (config.json + *.safetensors)"),
    "unknown method": (["--method", "INT3"], "allowed: BNB_INT8, BNB_NF4, GPTQ, W8A8"),
    "QLORA": (["--method", "QLORA"], "QLORA quantizes during training: use Fine-tuning/01_Train.py"),
    "NONE": (["--method", "NONE"], "NONE is not a post-training method"),
    "nf4 bits": (["--method", "BNB_NF4", "--bits", "8"], "does not support 8-bit weights; allowed bits: 4"),
    "gptq bits": (["--method", "GPTQ", "--bits", "3"], "allowed bits: 4, 8"),
    "gptq group": (["--method", "GPTQ", "--group-size", "100"], "allowed group sizes: 128, 64, 32"),
    "int8 group": (["--method", "BNB_INT8", "--group-size", "64"], "allowed group sizes: none"),
    "group vs model": (["--method", "GPTQ", "--group-size", "128", "--calibration", "openmath"],
                       "group size 128 does not divide this model's layer input widths [64]"),
    "wrong columns": (["--method", "GPTQ", "--group-size", "64", "--calibration", "openmath", "--calibration-path",
                       str(SQUAD_SAMPLE)], "row 1: 'problem' is missing (the openmath format needs problem, generated_solution"),
    "no calibration": (["--method", "W8A8"], "needs calibration data and"),
    "data-free": (["--method", "BNB_NF4", "--calibration", "squad"], "BNB_NF4 is data-free"),
    "samples": (["--method", "GPTQ", "--samples", "0"], "--samples=0: need at least 1"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model_dir, tmp_path):
    args, expected = BAD_INPUT[case]
    (tmp_path / "empty").mkdir()
    out_root = tmp_path / "out"
    args = [a.format(tmp=tmp_path, empty=tmp_path / "empty") for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    with pytest.raises(SystemExit) as raised:
        quantize_main([*args, "--out-root", str(out_root)])
    message = str(raised.value.code)
    assert message.startswith("error: ") and "\n" not in message and expected in message, message
    assert not out_root.exists()


@pytest.mark.skipif(find_spec("llmcompressor") is not None, reason="llmcompressor is installed in this Python")
def test_llmcompressor_method_reruns_itself_in_the_ptq_environment(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """Run from an environment without llmcompressor, GPTQ re-runs the same command with the PTQ environment's
    Python. That Python here is this one (PTQ_PYTHON), which lacks it too: the re-run says so and stops."""
    monkeypatch.setenv("PTQ_PYTHON", sys.executable)
    with pytest.raises(SystemExit) as raised:
        quantize_main(["--model", str(tiny_model_dir), "--method", "GPTQ", "--group-size", "64", "--calibration",
                       "openmath", "--calibration-path", str(OPENMATH_SAMPLE), "--out-root", str(tmp_path / "out")])
    assert raised.value.code == 1  # the re-run's exit status
    out, err = capfd.readouterr()
    assert f"GPTQ needs llmcompressor: running in the PTQ environment ({sys.executable})" in out
    assert f"error: GPTQ needs llmcompressor, which this Python ({sys.executable}) (the PTQ environment) lacks: " \
           "bash scripts/setup_ptq.sh" in err
    assert not (tmp_path / "out").exists()


def test_quality_rows_leave_out_every_calibration_row(source):
    """A calibrated method's quality rows are the source's held-out rows minus those used for calibration."""
    import argparse

    from qlora.data.formats import load_rows, to_sft_dataset
    from quantization_utils import build_ptq_plan
    from tools.quantize import inspect_source, quality_rows

    spec, _ = build_ptq_plan("GPTQ")
    calibration_rows = load_rows("openmath", str(OPENMATH_SAMPLE), 150)  # most of the 216 rows the split draws from
    args = argparse.Namespace(quality_rows=16, samples=150)
    examples, where = quality_rows(args, spec, inspect_source(source), ("openmath", str(OPENMATH_SAMPLE)), calibration_rows)
    calibration = [json.dumps(e, sort_keys=True) for e in to_sft_dataset(calibration_rows, "openmath")]
    assert 0 < len(examples) < 16 and "held-out rows" in where  # some held-out rows were calibration rows
    assert not any(json.dumps(e, sort_keys=True) in calibration for e in examples)


# ----- llmcompressor (PTQ environment) ------------------------------------------------------------------

LLMC_CASES = {
    "GPTQ": (["--group-size", "64"], "GPTQ_w4g64_headbf16",
             {"weights_bits": 4, "backend": "compressed-tensors"}, "pack-quantized"),
    "W8A8": ([], "W8A8_w8_headbf16", {"weights_bits": 8, "backend": "compressed-tensors"}, "int-quantized"),
}


@pytest.mark.ptq
@pytest.mark.parametrize("method", LLMC_CASES)
def test_llmcompressor_sibling(method, source, tmp_path):
    python = ptq_python()
    if python is None:
        pytest.skip("PTQ environment absent: run `bash scripts/setup_ptq.sh` (or set PTQ_PYTHON)")
    args, tag, expected, fmt = LLMC_CASES[method]
    # No --calibration: the source's metadata names its training data (the openmath sample file).
    out_root = tmp_path / "out"
    # GPTQ is started from the main environment, as a user would: it re-runs itself in the PTQ environment
    launcher = sys.executable if method == "GPTQ" else python
    result = run_quantize(launcher, ["--model", source, "--method", method, "--out-root", out_root, *args,
                                     "--samples", "8"])
    assert result.returncode == 0, result.stderr[-3000:]
    if launcher != python:
        assert f"running in the PTQ environment ({python})" in result.stdout
    sibling = out_root / f"Qwen3-0.6B-openmath_SFT_LoRa8_{tag}"
    assert [p.name for p in out_root.iterdir()] == [sibling.name]  # no staging directory left behind
    check = sibling_logits(python, source, [sibling], tmp_path)[sibling]
    meta = check_metadata(sibling, source, {"method": method, "lm_head_dtype": "bf16", **expected})
    extras = meta["quantization"]["extras"]
    assert extras["format"] == fmt and extras["quantizer"] == "llmcompressor"
    assert extras["calibration"] == {"dataset": "openmath", "path": str(OPENMATH_SAMPLE.resolve()), "rows": 8,
                                     "max_seq_length": 512}
    config = json.loads((sibling / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    assert check["relative_error"] < BOUNDS[method], check

