"""Shared fixtures: tiny models the tests build themselves (no hub access needed)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "Fine-tuning" / "01_Train.py"
OPENMATH_SAMPLE = ROOT / "samples" / "openmath_sample.jsonl"
SQUAD_SAMPLE = ROOT / "samples" / "squad_sample.jsonl"

# metadata.json's quantization block for QLoRA r=256 with a merge, field for field as the design fixes it.
SEED_QUANTIZATION_BLOCK = {
    "method": "QLORA", "weights_bits": 4, "lm_head_dtype": "bf16", "backend": "bitsandbytes",
    "extras": {"double_quant": True, "base_quant_type": "nf4", "compute_dtype": "bfloat16", "lora_r": 256,
               "merge_after_train": True},
}
# Small and fast: a few QLoRA steps on CPU take seconds.
FAST_TRAIN_ARGS = [
    "--max_steps=12", "--per_device_train_batch_size=4", "--gradient_accumulation_steps=1",
    "--learning_rate=2e-3", "--logging_steps=2", "--max_seq_length=128", "--eval_samples=16",
    "--max_train_samples=200",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen3 in a directory named like the real model, so output names match the spec."""
    from tools.make_tiny_model import main as make_tiny_model

    out = tmp_path_factory.mktemp("models") / "Qwen3-0.6B"
    make_tiny_model([str(out)])
    return out


def run_train(args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run Fine-tuning/01_Train.py in a fresh process with --NAME=value overrides."""
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def train_on_openmath_sample(model_dir, out, *args) -> subprocess.CompletedProcess:
    """01_Train.py on `model_dir` with the shipped openmath sample into `out`; the run must succeed."""
    result = run_train([f"--MODEL_NAME={model_dir}", f"--DATASET_PATH={OPENMATH_SAMPLE}", f"--OUTPUT_ROOT={out}", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_python(code: str, timeout=300) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (imports nothing from the test process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def build_base_model(out: Path, style: str, model_type: str) -> Path:
    """A random tiny base model of `model_type` with a `style` tokenizer (llama | gemma): no chat template."""
    from qlora.model.fixtures import base_tokenizer, build_random_model, tokenizer_corpus

    build_random_model(out, base_tokenizer(tokenizer_corpus(), 512, style), model_type=model_type)
    return out


@pytest.fixture(scope="session")
def llama_base_dir(tmp_path_factory) -> Path:
    """Tiny Llama-architecture base model: Llama-style tokenizer (BOS added, EOS, no pad), no chat template."""
    return build_base_model(tmp_path_factory.mktemp("models") / "tiny-llama-base", "llama", "llama")


@pytest.fixture(scope="session")
def gemma_base_dir(tmp_path_factory) -> Path:
    """Tiny Gemma 3 (text) base model: Gemma-style tokenizer (BOS added, EOS, pad), no chat template."""
    return build_base_model(tmp_path_factory.mktemp("models") / "tiny-gemma-base", "gemma", "gemma3_text")
