"""Evaluate output directories (and plain base models) side by side.

    python tools/evaluate.py DIR [DIR ...] [--dataset NAME] [--dataset-path FILE] [--limit N] [--trust-remote-code]

Each directory's kind is detected from its metadata.json (or, without one, from its name) and it is
loaded that way: a merged or fully fine-tuned model, an adapter on the 4-bit base rebuilt from the
metadata's quantization plan, a post-training-quantized sibling, or a plain base model. Every model is
scored on the held-out split its training run used (rebuilt from the metadata), or on the dataset given:
openmath final-answer accuracy, squad exact match / F1 (messages and prompt_completion data have no answer
metric), held-out loss and perplexity on the completions, weight footprint (quantization state included),
load time and greedy generation tokens/s.
Writes eval_results.json into each directory, prints one markdown table, and with several directories
writes a PNG chart of accuracy against weight footprint.
Python code shipped inside a directory (auto_map) runs only with --trust-remote-code, whatever its
metadata.json says. Every directory, and every held-out split, is checked before the first model loads.
"""

import argparse

from qlora.data.formats import DATASETS
from qlora.evaluation import EvalOptions, evaluate_dirs

DEFAULTS = EvalOptions()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="output directories of 01_Train.py / tools/quantize.py, or base models")
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="evaluate on this dataset (default: the training one)")
    parser.add_argument("--dataset-path", help="local file or hub id in the dataset's format (default: the hub dataset)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N held-out rows")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help="generation length limit per answer")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="prompts generated together")
    parser.add_argument("--chart", default=DEFAULTS.chart, help="PNG written when several dirs are evaluated")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped inside a model directory (auto_map); only for sources you trust. "
                             "Off unless given here: a directory's own files never turn it on")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    options = EvalOptions(dataset=args.dataset, dataset_path=args.dataset_path, limit=args.limit,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chart=args.chart,
                          trust_remote_code=args.trust_remote_code)
    return evaluate_dirs(args.dirs, options)


if __name__ == "__main__":
    main()
