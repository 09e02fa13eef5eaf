"""Build a tiny randomly initialised Qwen3-architecture model with a BPE tokenizer, for smoke runs
and tests on machines without hub access. Its outputs are noise until trained."""

import argparse
from pathlib import Path

from qlora.model.fixtures import build_tiny_model


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="directory to write (its last component becomes the output-name prefix)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed")
    args = parser.parse_args(argv)
    build_tiny_model(args.out_dir, args.vocab_size, args.hidden_size, args.layers, args.seed)
    print(f"wrote {args.out_dir}")
    return Path(args.out_dir)


if __name__ == "__main__":
    main()
