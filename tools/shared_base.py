"""Serve a run's adapter exactly without bitsandbytes: on the shared bf16 base it was trained on.

    python tools/shared_base.py outputs/Qwen3-0.6B-openmath_SFT_LoRa16_QLORA_w4_headbf16 [--root outputs]

A QLoRA adapter learned to correct the 4-bit base, not the 16-bit one: PEFT with defaults and vLLM's LoRA put
it on the 16-bit base and compute another function. This writes, once per base model and quantization plan,
ROOT/shared-bases/NAME-nf4-dq-bf16-HASH: the base's NF4 weights dequantized, saved as a plain bf16 model that
transformers loads without bitsandbytes (every later run on the same base reuses it). The run's adapter is then
loaded on it by PEFT with its defaults and compared with the trained model (the adapter on its 4-bit base) on
the run's held-out rows, as the merge check compares a merge. When it passes, adapter/adapter_config.json names
the shared base, so `AutoPeftModelForCausalLM.from_pretrained(RUN/adapter)` and LoRA serving on that base give
the trained model; the figures go into metadata.json under `shared_base` and into the model cards. The 4-bit
path (the adapter on the original base loaded with adapter/base_quantization_config.json) keeps working.
Python code shipped with the base runs only with --trust-remote-code.
"""

import argparse
from pathlib import Path

from qlora.core.errors import one_line_errors
from qlora.core.files import write_json
from qlora.core.logs import setup_logging, step
from qlora.evaluation import held_out_rows, training_split
from qlora.model.loading import pick_device
from qlora.outputs.model_card import write_model_cards
from qlora.outputs.read import check_adapter_run, check_remote_code, metadata_fields
from qlora.outputs.shared_base import serve_on_shared_base


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a finished output directory of Fine-tuning/01_Train.py with an adapter/")
    parser.add_argument("--root", help="the folder whose shared-bases/ holds the shared bases (default: DIR's parent, "
                                       "the run's OUTPUT_ROOT)")
    parser.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda when there is one)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the base model (auto_map); only for sources you trust. "
                             "Off unless given here: a directory's own files never turn it on")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(is_main=True)
    with one_line_errors():
        directory = Path(args.dir)
        metadata = check_adapter_run(directory)
        check_remote_code(directory, metadata, args.trust_remote_code)
        root = Path(args.root) if args.root else directory.resolve().parent
        with metadata_fields(directory):
            record = serve_on_shared_base(
                directory, metadata, root, args.device or pick_device(), args.trust_remote_code,
                held_out=lambda meta, rows: held_out_rows(training_split(meta), rows),
                report=lambda line: step("shared", "%s", line))
        metadata["shared_base"] = record
        write_json(directory / "metadata.json", metadata)
        write_model_cards(directory, metadata)
    verdict = "passed: adapter_config.json names it" if record["passed"] else "FAILED: adapter_config.json left as it was"
    step("done", "%s: mean KL %.3g against limit %.3g, max |logit diff| %.4g: %s (%.1fs)", record["path"],
         record["mean_kl"], record["kl_limit"], record["max_abs_logit_diff"], verdict, record["seconds"])
    if not record["passed"]:
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
