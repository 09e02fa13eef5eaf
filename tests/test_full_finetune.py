"""Full fine-tuning (PEFT_CONFIG=Full) end to end, with bf16 weights and with fp32 master weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_TRAIN_ARGS, train_on_openmath_sample

NAME = "Qwen3-0.6B-openmath_SFT_Full_BF16_w16_headbf16"  # the tag names what is on disk: bf16 weights
# Small enough that one AdamW update (about the rate) is under half a bf16 step of a typical weight (std 0.02)
SMALL_RATE = "1e-5"


@pytest.fixture(scope="module")
def full_runs(tiny_model_dir, tmp_path_factory):
    runs = {}
    for dtype in ("bf16", "fp32"):
        out = tmp_path_factory.mktemp(f"full_{dtype}")
        train_on_openmath_sample(tiny_model_dir, out, *FAST_TRAIN_ARGS, "--QUANT_METHOD=NONE", "--PEFT_CONFIG=Full",
                                 f"--full_weights_dtype={dtype}", f"--learning_rate={SMALL_RATE}")
        runs[dtype] = out / NAME
    return runs


def _changed_fraction(base_dir, trained_dir) -> float:
    base, trained = load_file(base_dir / "model.safetensors"), load_file(trained_dir / "model.safetensors")
    linear = [name for name in base if name.endswith("proj.weight")]
    changed = sum(int((base[n] != trained[n]).sum()) for n in linear)
    return changed / sum(base[n].numel() for n in linear)


def test_both_write_a_bf16_model_with_true_metadata(full_runs):
    for dtype, run in full_runs.items():
        meta = json.loads((run / "metadata.json").read_text())
        assert meta["config"]["full_weights_dtype"] == dtype and meta["peft"] == "Full"
        assert meta["artifact"]["kind"] == "full_bf16" and meta["artifact"]["adapter_dir"] is None
        assert sorted(p.name for p in run.iterdir() if p.is_dir()) == []  # no adapter/: full fine-tuning has none
        assert {t.dtype for t in load_file(run / "model.safetensors").values()} == {torch.bfloat16}
        card = (run / "README.md").read_text()
        assert {"bf16": "| base weights during training | bf16 (no quantization) |",
                "fp32": "| base weights during training | fp32 master weights, bf16 compute (no quantization); saved in bf16 |",
                }[dtype] in card
        # the planner counts the weights and their gradients at the trained dtype
        parts = meta["memory_plan"]["parts"]
        assert parts["weights"] == parts["gradients"] == meta["parameters"]["total"] * {"bf16": 2, "fp32": 4}[dtype]


def test_fp32_master_weights_keep_the_updates_bf16_weights_round_away(full_runs, tiny_model_dir):
    bf16, fp32 = (_changed_fraction(tiny_model_dir, full_runs[d]) for d in ("bf16", "fp32"))
    assert fp32 > 0.4 and bf16 < fp32 / 2, (bf16, fp32)  # measured: 0.53 and 0.15
