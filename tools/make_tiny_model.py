"""Build a tiny randomly initialised Qwen3-architecture model with a BPE tokenizer, for smoke runs
and tests on machines without hub access. Its outputs are noise until trained."""

import argparse
import sys
from pathlib import Path


from qlora.data.synthetic import generate_rows
from qlora.model.fixtures import build_random_model, train_bpe_tokenizer


def tokenizer_corpus(rows_per_dataset: int = 400) -> list[str]:
    texts = []
    for row in generate_rows("openmath", rows_per_dataset):
        texts += [row["problem"], row["generated_solution"]]
    for row in generate_rows("squad", rows_per_dataset):
        texts += [row["context"], row["question"]]
    return texts


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="directory to write (its last component becomes the output-name prefix)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed")
    args = parser.parse_args(argv)
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), args.vocab_size)
    build_random_model(args.out_dir, tokenizer, seed=args.seed, hidden_size=args.hidden_size,
                      intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers)
    print(f"wrote {args.out_dir}")
    return Path(args.out_dir)


if __name__ == "__main__":
    main()
