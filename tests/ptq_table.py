"""Measure every PTQ method on one model: relative logit error vs the source, size on disk, quantize time.

    python tests/ptq_table.py --model DIR [--methods BNB_INT8,GPTQ] [--samples 128] [--group-size 64] [--out-root DIR]

Each sibling is written by tools/quantize.py (bitsandbytes methods with this Python, llmcompressor ones
with the PTQ environment's) and reloaded in a fresh process; the source's logits come from a fresh
process of the same Python. Prints a markdown table; methods whose environment is missing are listed
as skipped.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from ptq_support import OPENMATH_SAMPLE, check_texts, dir_bytes, fresh_logits, python_for, run_quantize

from qlora.checks.logits import compare_logits
from quantization_utils import PTQ_METHODS, QuantMethod


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="16-bit source model directory")
    parser.add_argument("--methods", default=",".join(m.value for m in PTQ_METHODS), help="comma-separated methods")
    parser.add_argument("--samples", type=int, default=128, help="calibration rows for calibrated methods")
    parser.add_argument("--group-size", type=int, default=None, help="GPTQ group size (default: the method's)")
    parser.add_argument("--texts", type=int, default=8, help="held-out texts the logits are compared on")
    parser.add_argument("--out-root", default=None, help="where siblings go (default: a temporary directory)")
    args = parser.parse_args(argv)
    source = Path(args.model)
    out_root = Path(args.out_root or tempfile.mkdtemp(prefix="ptq_table_"))
    texts = check_texts(args.texts)
    rows = []
    print(f"source {source}: {dir_bytes(source) / 1e6:.2f} MB on disk")
    for name in args.methods.split(","):
        method = QuantMethod.parse(name)
        python = python_for(method)
        if python is None:
            rows.append(f"| {method.value} | skipped: PTQ environment absent | | | | |")
            continue
        calibration = (["--calibration", "openmath", "--calibration-path", OPENMATH_SAMPLE, "--samples", args.samples]
                       if PTQ_METHODS[method].calibrated else [])
        if method is QuantMethod.GPTQ and args.group_size:
            calibration += ["--group-size", args.group_size]
        started = time.time()
        result = run_quantize(python, ["--model", source, "--method", method.value, "--out-root", out_root,
                                       *calibration], timeout=3600)
        wall = time.time() - started
        if result.returncode != 0:
            rows.append(f"| {method.value} | failed: {result.stderr.strip().splitlines()[-1]} | | | | |")
            continue
        sibling = Path(result.stdout.strip().splitlines()[-1].split("-> ")[-1])
        meta = json.loads((sibling / "metadata.json").read_text())
        logits, batches = fresh_logits(python, [source, sibling], texts, out_root / f"{sibling.name}.pt")
        check = compare_logits(logits[source], logits[sibling], batches)
        tag = "_".join(sibling.name.rsplit("_", 3)[-3:])
        rows.append(f"| {method.value} | {tag} | {check['relative_error']:.4f} | "
                    f"{check['mean_kl']:.2e} | {meta['artifact']['weights_bytes'] / 1e6:.2f} MB "
                    f"({dir_bytes(sibling) / 1e6:.2f} MB dir) | {meta['quantize_seconds']:.1f} s ({wall:.1f} s wall) |")
    print("| method | tag | rel. logit error | mean KL | weights on disk | quantize time |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
