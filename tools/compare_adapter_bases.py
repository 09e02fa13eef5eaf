"""Score one run's adapter on each base a client may put it on, beside its merged model.

    python tools/compare_adapter_bases.py outputs/DIR [--rows 100]

Rows, one per way of loading: the trained model (the adapter on its 4-bit base, by the run's plan), the merged
model (when the run wrote one), the adapter loaded by `AutoPeftModelForCausalLM` with defaults (the base its
adapter_config.json names: the shared base once tools/shared_base.py has passed on it, else the original), and
the adapter on the original 16-bit base. Each: the dataset's metric on the run's held-out rows (greedy), and
the mean KL(trained || it) per token over the first 16 of them (prompt and reference completion).
"""

import argparse
import json
from pathlib import Path

from qlora.core.errors import one_line_errors
from qlora.evaluation import compare_adapter_bases
from qlora.outputs.read import check_adapter_run, metadata_fields


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a finished output directory of Fine-tuning/01_Train.py with an adapter/")
    parser.add_argument("--rows", type=int, default=100, help="held-out rows scored (from the run's own split)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy generation budget per row")
    parser.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda when there is one)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    with one_line_errors():
        directory = Path(args.dir)
        check_adapter_run(directory)
        with metadata_fields(directory):
            results = compare_adapter_bases(directory, args.rows, args.max_new_tokens, device=args.device)
    for result in results:
        print(json.dumps(result), flush=True)
    return results


if __name__ == "__main__":
    main()
