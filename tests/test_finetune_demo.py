"""The demo comparison (tools/finetune_demo.py): per-method learning rates, the seed summary, and a guard that
full fine-tuning at the demo's rate keeps what the base model knows."""

import json
import math

import pytest

from conftest import ROOT

from qlora.demo import METHODS, binomial_se, parse_rates, summarize, train_args
from tools.finetune_demo import build_parser, main


def test_each_method_trains_at_its_own_rate_and_lr_overrides_one():
    args = build_parser().parse_args(["--data", "d.jsonl", "--lr", "full=2e-5"])
    rate = {m: next(a for a in train_args(args, m, "out") if a.startswith("--learning_rate=")) for m in METHODS}
    assert rate["full"] == "--learning_rate=2e-05"
    assert rate["qlora"] == f"--learning_rate={METHODS['qlora'].learning_rate}"
    assert "--seed=43" in train_args(args, "lora", "out", seed=43)


@pytest.mark.parametrize("text", ["4e-3", "qlora", "qlora=", "qlora=fast", "dora=1e-3", "qlora=1e-3,qlora=2e-3",
                                  "full=0", "full=1.5", "full=nan", "qlora=1e-3,"])
def test_bad_lr_is_one_line_before_any_training(text, tmp_path):
    with pytest.raises(ValueError, match="METHOD=RATE"):
        parse_rates(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "missing.jsonl"), "--lr", text, "--out-root", str(tmp_path / "out")])
    message = str(exit_info.value)
    assert message.startswith("error: --lr") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_bad_seeds_and_methods_are_refused(tmp_path):
    for argv in (["--seeds", "0"], ["--methods", "qlora,qlora"], ["--methods", "dora"], ["--methods", ","]):
        with pytest.raises(SystemExit, match="^error: --(seeds|methods)"):
            main(["--data", str(tmp_path / "d.jsonl"), *argv])


def test_summary_is_mean_sample_std_range_and_one_run_noise():
    runs = [{"method": "base", "seed": 42, "learning_rate": None, "accuracy": 0.0, "heldout_loss": 10.0, "rows": 100}]
    runs += [{"method": "qlora", "seed": s, "learning_rate": 4e-3, "accuracy": a, "heldout_loss": 0.7, "rows": 100}
             for s, a in ((42, 60.0), (43, 70.0), (44, 80.0))]
    base, qlora = summarize(runs)
    assert (base["n"], base["accuracy_sample_std"], base["one_run_se"]) == (1, None, 0.0)
    assert qlora["n"] == 3 and qlora["seeds"] == [42, 43, 44] and qlora["accuracy_mean"] == 70.0
    assert qlora["accuracy_sample_std"] == 10.0  # sample (n - 1) standard deviation, not population
    assert (qlora["accuracy_min"], qlora["accuracy_max"]) == (60.0, 80.0)
    assert qlora["one_run_se"] == pytest.approx(100 * math.sqrt(0.7 * 0.3 / 100))  # 4.58 points at 100 rows
    assert binomial_se(70.0, 400) == pytest.approx(qlora["one_run_se"] / 2)


def test_chart_of_means_with_error_bars_is_written(tmp_path):
    from qlora.demo import write_method_chart

    runs = [{"method": "qlora", "seed": s, "learning_rate": 4e-3, "accuracy": a, "heldout_loss": 0.7, "rows": 100}
            for s, a in ((42, 60.0), (43, 70.0))]
    base = {"method": "base", "seed": 42, "learning_rate": None, "accuracy": 0.0, "heldout_loss": 10.0, "rows": 100}
    write_method_chart(summarize([base, *runs]), runs, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_demo_rate_is_one_the_sweep_measured_near_its_best():
    """A rate changed without a sweep behind it (e.g. full fine-tuning back at 1e-3: 0.5%) fails here."""
    sweep = json.loads((ROOT / "docs" / "data" / "demo_lr_sweep.json").read_text())["runs"]
    for name, method in METHODS.items():
        measured = {r["learning_rate"]: r["accuracy"] for r in sweep if r["method"] == name}
        assert method.learning_rate in measured, f"{name}: {method.learning_rate:g} not in the sweep {sorted(measured)}"
        # within noise of the method's best: one run on 200 rows has a standard error of ~3 points at 70%
        assert measured[method.learning_rate] >= max(measured.values()) - 10, (name, measured)


# The demo's settings (600 steps: with fewer, e.g. 200, full fine-tuning at 3e-3 had not yet learned to read the
# numbers and scored 0) and fewer held-out rows, on generated rows of a seed the documented runs do not use.
# Measured here: 77.5% at the demo's rate 3e-3; 2.5% at 1e-3 (answer format, numbers of its own) and 45.0% at
# 1e-2 (arithmetic breaks), both caught. About 2 minutes on one CPU thread.
GUARD_ROWS, GUARD_MIN_ACCURACY = 40, 50.0


@pytest.mark.slow
def test_full_fine_tuning_at_the_demo_rate_beats_the_base_model(tmp_path):
    from tools.make_samples import main as make_samples

    make_samples(["--out-dir", str(tmp_path / "data"), "--rows", str(1500 + GUARD_ROWS), "--seed", "3"])
    out = main(["--methods", "full", "--data", str(tmp_path / "data" / "openmath_sample.jsonl"),
                "--out-root", str(tmp_path / "out"), "--eval-rows", str(GUARD_ROWS)])
    base, full = out["summary"]
    assert full["method"] == "full" and full["learning_rate"] == METHODS["full"].learning_rate
    assert base["accuracy_mean"] < GUARD_MIN_ACCURACY <= full["accuracy_mean"], out["summary"]
